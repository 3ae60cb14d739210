"""Communication volume read off a (rewritten) graph: bytes each rank sends and receives, per
collective and per layer, symbolic in the token count.

Every collective node of the graph (`_c10d_functional.*`, `vllm.*`, `_C.shm_allreduce`, and the
platform collectives of `fxpasses.op_forms`, e.g. vllm-ascend's `vllm.maybe_pad_and_reduce`) is
measured from its own fake shapes (`meta["val"]`), so the numbers are what the graph will move,
not what a formula says it should. Accounting (n = group size, B = bytes of the full tensor):

    all_reduce      B = input                       send = recv = 2 (n-1)/n B   (ring)
    reduce_scatter  B = input (the full, padded)    send = recv =   (n-1)/n B
    all_gather      B = output (n x input)          send = recv =   (n-1)/n B
    all_to_all      B = input                       send = recv =   (n-1)/n B   (equal splits)

`fxpasses::odp_weight` and `fxpasses::odp_quant_blocks` (FlashComm2's one-time o_proj weight
all-gathers) are reported as one-time weight transfers, not per-step traffic. Bytes follow each
tensor's dtype: int8 values count 1 byte per element, their float32 scales 4. A fused matmul + collective of `fxpasses.lowering` counts
as the collective inside it (`lowering.match.FUSED_COLLECTIVES`: the same bytes as the pair it
replaced); its `fxpasses::rank0_bias` is a one-time transfer. Group sizes come from the node itself
(reduce_scatter/all_gather carry it), from fxpasses' `meta["fxpasses"]["group_size"]` tag, or
from `group_sizes` ({group name: size}) for the model's own all-reduces (a platform op that names
no group is looked up by its implicit group's label, else takes `default_group_size`).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.lowering.match import FUSED_COLLECTIVES
from fxpasses.lowering.match import ONE_TIME as LOWERING_ONE_TIME

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class CollectiveVolume:
    node: str
    kind: str            # all_reduce | reduce_scatter | all_gather | all_to_all | weight_gather
    group: str
    group_size: int
    layer: str           # "pre" (before layer 0, e.g. the embedding), "0", "1", ..., "post"
    site: str            # innermost module prefix near the collective ("" when unknown)
    full_bytes: Any      # B: sympy expression (or int) in the token-count symbol(s)
    send_bytes: Any
    recv_bytes: Any
    one_time: bool = False
    dtype: str = ""      # what travels on the wire ("int8", "bfloat16", ...; "" for fused / one-time)

    def at(self, subs: dict) -> dict:
        return {"send": evaluate(self.send_bytes, subs), "recv": evaluate(self.recv_bytes, subs),
                "full": evaluate(self.full_bytes, subs)}


def _expr(x) -> Any:
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.Integer(int(x))


def numel_bytes(v: torch.Tensor) -> Any:
    """Symbolic bytes of a (fake) tensor."""
    e = sympy.Integer(v.element_size())
    for s in v.shape:
        e = e * _expr(s)
    return e


def evaluate(expr, subs: dict) -> float:
    if isinstance(expr, (int, float)):
        return expr
    e = expr.subs(subs) if subs else expr
    try:
        return int(e)
    except TypeError:
        return float(e)


def token_symbols(graph: fx.Graph) -> list[sympy.Symbol]:
    """The free symbols of the graph inputs (the token count is one of them)."""
    syms: "OrderedDict[sympy.Symbol, None]" = OrderedDict()
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = gf.val(n)
        vals = [v] if isinstance(v, torch.SymInt) else (list(v.shape) if isinstance(v, torch.Tensor) else [])
        for s in vals:
            if isinstance(s, torch.SymInt):
                for f in s.node.expr.free_symbols:
                    syms[f] = None
    return list(syms)


def _group_size(node: fx.Node, group_sizes: dict[str, int] | None, default: int | None) -> int:
    tag = node.meta.get("fxpasses", {})
    if tag.get("group_size"):
        return int(tag["group_size"])
    stated = gf.collective_world_size(node)
    if stated is not None:
        return stated
    g = gf.collective_group(node)
    if group_sizes and g in group_sizes:
        return int(group_sizes[g])
    if default:
        return int(default)
    raise ValueError(f"cannot tell the group size of collective {node.name} (group {g!r}); "
                     "pass group_sizes={name: size} or default_group_size")


def layer_of(path: str) -> str | None:
    """The decoder layer index in a module path ("model.layers.3.mlp" -> "3"), None outside layers."""
    m = _LAYER_RE.search("." + path)
    return m.group(1) if m else None


def _layer_and_site(node: fx.Node, last: tuple[str, str]) -> tuple[str, str] | None:
    st = gf.module_stack_last(node)
    if st is None:
        return None
    path = st[0]
    m = _LAYER_RE.search("." + path)
    return (m.group(1) if m else None), path


def _input_tensor(node: fx.Node) -> torch.Tensor | None:
    return gf.val(gf.collective_input(node))


#: fxpasses' one-time weight gathers (FlashComm2): op -> positions of its group_name, group_size
ONE_TIME_GATHERS = {"fxpasses::odp_weight": (3, 4), "fxpasses::odp_quant_blocks": (6, 7)}


def collective_volumes(graph: fx.Graph, group_sizes: dict[str, int] | None = None,
                       default_group_size: int | None = None) -> list[CollectiveVolume]:
    """Every collective of `graph`, in graph order, with its per-rank send/recv bytes."""
    out: list[CollectiveVolume] = []
    layer, site, seen_layer = "pre", "", False
    for node in graph.nodes:
        ls = _layer_and_site(node, (layer, site)) if node.op == "call_function" else None
        if ls is not None:
            lay, path = ls
            if lay is not None:
                layer, seen_layer = lay, True
            elif seen_layer:
                layer = "post"
            site = path
        name = gf.op_name(node)
        if name in ONE_TIME_GATHERS:
            gpos, pos = ONE_TIME_GATHERS[name]
            n = int(node.args[pos] if len(node.args) > pos else node.kwargs["group_size"])
            v = gf.val(node)
            full = sum((numel_bytes(t) for t in (v if isinstance(v, (list, tuple)) else [v])), sympy.Integer(0))
            part = full * sympy.Rational(n - 1, n)
            out.append(CollectiveVolume(node.name, "weight_gather", str(node.args[gpos]), n, layer, site, full,
                                        part, part, one_time=True))
            continue
        if name in FUSED_COLLECTIVES or name in LOWERING_ONE_TIME:  # a lowered pair (fxpasses.lowering)
            out.append(_fused_volume(node, name, layer, site, group_sizes, default_group_size))
            continue
        kind = gf.collective_kind(node)
        if kind is None:
            continue
        n = _group_size(node, group_sizes, default_group_size)
        x = _input_tensor(node)
        if kind == "all_gather":
            outv = gf.val(node)
            full = numel_bytes(outv) if isinstance(outv, torch.Tensor) else numel_bytes(x) * n
        else:
            full = numel_bytes(x)
        factor = sympy.Rational(2 * (n - 1), n) if kind == "all_reduce" else sympy.Rational(n - 1, n)
        b = sympy.expand(full * factor) if n > 1 else sympy.Integer(0)
        dt = str(x.dtype).removeprefix("torch.") if isinstance(x, torch.Tensor) else ""
        out.append(CollectiveVolume(node.name, kind, gf.collective_group(node), n, layer, site, full, b, b,
                                    dtype=dt))
    return out


def _fused_volume(node: fx.Node, name: str, layer: str, site: str, group_sizes, default) -> CollectiveVolume:
    """A fused matmul + collective (`fxpasses.lowering`) counts as the collective inside it: the
    bytes its pair's collective moved (`FUSED_COLLECTIVES` says which tensor they are measured on);
    `fxpasses::rank0_bias` is a one-time transfer of one bias vector."""
    if name in LOWERING_ONE_TIME:
        garg, sarg = LOWERING_ONE_TIME[name]
        n = int(op_forms.arg(node, sarg))
        full = numel_bytes(gf.val(node))
        b = sympy.expand(full * sympy.Rational(2 * (n - 1), n))
        return CollectiveVolume(node.name, "bias_reduce", str(op_forms.arg(node, garg)), n, layer, site, full, b, b,
                                one_time=True)
    kind, on, targ, sarg, garg = FUSED_COLLECTIVES[name]
    tag = node.meta.get("fxpasses", {})
    n = int(op_forms.arg(node, sarg)) if sarg else int(tag.get("group_size") or default or 0)
    if not n:
        raise ValueError(f"cannot tell the group size of fused op {node.name}; pass default_group_size")
    v = gf.val(node)
    if on == "in_x_n":
        full = numel_bytes(gf.val(op_forms.arg(node, targ))) * n
    else:
        outv = v if isinstance(v, torch.Tensor) else (v[1][0] if name.startswith("symm_mem") else v[0])
        full = numel_bytes(outv) * (n if on == "out_x_n" else 1)
    factor = sympy.Rational(2 * (n - 1), n) if kind == "all_reduce" else sympy.Rational(n - 1, n)
    b = sympy.expand(full * factor) if n > 1 else sympy.Integer(0)
    return CollectiveVolume(node.name, kind, str(tag.get("group") or op_forms.arg(node, garg)), n, layer, site,
                            full, b, b)


def per_layer(vols: list[CollectiveVolume], subs: dict) -> "OrderedDict[str, dict]":
    """{layer: {kind: send bytes, ..., "total": send bytes}} per step (one-time transfers excluded)."""
    res: "OrderedDict[str, dict]" = OrderedDict()
    for v in vols:
        if v.one_time:
            continue
        d = res.setdefault(v.layer, {})
        b = evaluate(v.send_bytes, subs)
        d[v.kind] = d.get(v.kind, 0) + b
        d["total"] = d.get("total", 0) + b
        d.setdefault("ops", []).append(v.kind)
    return res


def totals(vols: list[CollectiveVolume], subs: dict) -> dict:
    """Per-step and one-time send bytes; `per_step_send_int8`: the part of the per-step bytes that
    travels as int8 (W8A8 activations and their packed scales, int8 on the wire)."""
    step = sum(evaluate(v.send_bytes, subs) for v in vols if not v.one_time)
    once = sum(evaluate(v.send_bytes, subs) for v in vols if v.one_time)
    int8 = sum(evaluate(v.send_bytes, subs) for v in vols if not v.one_time and v.dtype == "int8")
    return {"per_step_send": step, "one_time_send": once, "per_step_send_int8": int8}


# a symbolic token count is evaluated at this many tokens per rank of the group (no padding anywhere)
REFERENCE_TOKENS = 4096


def step_bytes_pair(before: fx.Graph, after: fx.Graph, group_sizes: dict[str, int],
                    default_group_size: int, static_tokens: int | None = None) -> tuple[dict, dict, int]:
    """Per-step send bytes of each rank for two versions of one graph: ({"total": bytes,
    "layers": {layer: bytes}} before, the same after, tokens), at the graph's static token count,
    or at REFERENCE_TOKENS x the group size when it is symbolic (every free symbol of the inputs
    takes that value). `static_tokens`: the token count reported for a graph without symbols."""
    syms = token_symbols(before)
    tokens = REFERENCE_TOKENS * default_group_size
    subs = {s: tokens for s in syms}
    out = []
    for g in (before, after):
        vols = collective_volumes(g, group_sizes, default_group_size)
        out.append({"total": float(totals(vols, subs)["per_step_send"]),
                    "layers": {k: float(v["total"]) for k, v in per_layer(vols, subs).items()}})
    return out[0], out[1], (tokens if syms else static_tokens)


# ---- analytic minima for each layout (bytes each rank sends per decoder layer) ----------------------

def padded(T: int, n: int) -> int:
    return T + (-T) % n


@dataclass(frozen=True)
class LayerShape:
    """What the analytic layer models read of a decoder layer and its deployment (the keyword
    arguments `analytic_layer_collectives` and `fxpasses.token_gate` take)."""

    tp: int
    hidden: int
    attn_out: int
    dtype_bytes: int
    k: int = 1
    attn_in: int | None = None


def analytic_layer_collectives(strategy: str, *, T: int, **shape) -> list[tuple[str, int]]:
    """(kind, per-rank send bytes) of every collective one decoder layer runs in the *layout* each
    strategy produces (the one table the byte totals and the time model read); `shape`: the fields
    of `LayerShape`.

    attn_out = D, the o_proj input width over all heads (heads x v_head_dim); k = FlashComm2's K;
    attn_in = the width all-gathered before attention (default H: the normed hidden state feeding
    qkv_proj; MLA gathers its latents instead, q_lora + kv_lora + rope, computed on the shards).
    vanilla:     2 all_reduce [T, H]                       each 2(tp-1)/tp T H b
    flashcomm1:  rs(o) + ag(gate_up in) + rs(down), each (tp-1)/tp T_pad H b, + ag(attention in),
                 (tp-1)/tp T_pad attn_in b
    flashcomm2:  o_proj: all_to_all over ODP (n = tp/k) of [T_pad, D/tp] (the row bias travels with
                 the one-time weight gather, see `fxpasses.strategies.flashcomm2`) + (k>1) rs over OTP of
                 [T_pad/n, H]; then all_gather [T_pad, H] back to Replicate (alone) ; MLP all_reduce
    flashcomm1+flashcomm2: FlashComm1 with the o_proj rs replaced by FlashComm2's o_proj exchange.
    """
    sh = LayerShape(**shape)
    b, H, D, tp, k, attn_in = sh.dtype_bytes, sh.hidden, sh.attn_out, sh.tp, sh.k, sh.attn_in
    Tp = padded(T, tp)
    n = tp // k
    ring = lambda size, g: (g - 1) * size // g  # noqa: E731  bytes a rank sends for rs/ag/a2a of `size`
    ar = ("all_reduce", 2 * (tp - 1) * T * H * b // tp)
    rs, ag = ("reduce_scatter", ring(Tp * H * b, tp)), ("all_gather", ring(Tp * H * b, tp))
    attn_ag = ("all_gather", ring(Tp * (attn_in or H) * b, tp))
    fc2_o = [("all_to_all", ring(Tp * (D // tp) * b, n))] + (
        [("reduce_scatter", ring((Tp // n) * H * b, k))] if k > 1 else [])
    layers = {"vanilla": [ar, ar], "flashcomm1": [attn_ag, rs, ag, rs], "flashcomm2": [*fc2_o, ag, ar],
              "flashcomm1+flashcomm2": [attn_ag, *fc2_o, ag, rs]}
    if strategy not in layers:
        raise ValueError(f"no analytic model for strategy {strategy!r}")
    return layers[strategy]


def analytic_layer_bytes(strategy: str, *, T: int, **shape) -> dict[str, int]:
    """Per-rank bytes sent per decoder layer, by collective kind and in total
    (`analytic_layer_collectives` summed)."""
    out: dict[str, int] = {}
    for kind, nb in analytic_layer_collectives(strategy, T=T, **shape):
        out[kind] = out.get(kind, 0) + nb
    out["total"] = sum(out.values())
    return out
