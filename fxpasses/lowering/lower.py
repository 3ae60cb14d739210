"""The lowering step: after a rewrite is verified and committed (or a graph is kept as it was),
replace each matmul + collective pair by one fused kernel of the chosen backend.

Owns the choice of backend (`choose`, from the `lowering` configuration key and the platform),
the graph surgery (transactional: on a copy that replaces the graph only when it lints), and the
per-site record: which fused op, or why not. It never communicates and never creates a group:
everything it needs about a group (HCCL names, symmetric memory) was recorded at worker start.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.graph_copy import copy_graph, replace_graph_contents
from fxpasses.lowering import groups
from fxpasses.lowering.backends import BACKENDS, Backend, Site, call
from fxpasses.lowering.match import FUSED_COLLECTIVES, Pair, find_pairs

log = logging.getLogger("fxpasses")
aten = torch.ops.aten

MODES = ("auto", "off", "reference")
NO_CPU_KERNELS = "no fused kernels on CPU"


class LoweringError(RuntimeError):
    pass


def choose(mode: str) -> tuple[Backend | None, str]:
    """(backend, why) for a `lowering` value: `off` none; `reference` the CPU reference; `auto` the
    platform's (npu where torch_npu is installed, cuda where CUDA is), none on CPU."""
    if mode == "off":
        return None, "lowering: off"
    if mode == "reference":
        return BACKENDS["reference"], "lowering: reference (forced)"
    plat = groups.platform()
    if plat == "cpu":
        return None, NO_CPU_KERNELS
    return BACKENDS[plat], f"lowering: auto on {plat}"


def _prefix(node: fx.Node, module_prefix: str) -> str:
    st = gf.module_stack_last(node)
    return gf.layer_prefix(module_prefix, st[0]) if st else node.name


def _site(pair: Pair, ctx, module_prefix: str, weight_format: str = "unknown") -> Site | str:
    """The pair with its group resolved, or why its group cannot be fused over."""
    tp = ctx.tp_group
    prefix = _prefix(pair.matmul, module_prefix)
    ag_input = gf.collective_input(pair.head) if pair.kind == "all_gather_mm" else None
    if tp is not None and pair.group in (tp.c10d_name, tp.vllm_name, "shm"):
        return Site(pair, prefix, tp.c10d_name, tp.vllm_name, tp.size, True, ag_input, weight_format)
    if pair.group == "shm" or ":" in pair.group:  # a vLLM group name other than TP's
        return f"group: {pair.group} is a vLLM group other than TP"
    size = pair.group_size
    if size is None:
        try:
            import torch.distributed as dist
            from torch.distributed.distributed_c10d import _resolve_process_group

            size = dist.get_world_size(_resolve_process_group(pair.group))
        except Exception as e:
            return f"group: {pair.group} cannot be resolved ({type(e).__name__})"
    return Site(pair, prefix, pair.group, None, int(size), False, ag_input, weight_format)


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _hoist(node, before: fx.Node, order: dict, depth: int = 4) -> None:
    """Move `node` (a weight view: permute / t / view of an input) before `before` if it comes later."""
    if not isinstance(node, fx.Node) or order.get(node, -1) < order[before]:
        return
    if depth == 0 or node.op != "call_function":
        raise LoweringError(f"{node.name} cannot be moved before {before.name}")
    for a in node.all_input_nodes:
        _hoist(a, before, order, depth - 1)
    before.prepend(node)


def _erase(graph: fx.Graph, pair: Pair) -> None:
    for n in reversed(pair.erase):
        if n.users:
            raise LoweringError(f"{n.name} still has users {[u.name for u in n.users]} after fusing "
                                f"{pair.matmul.name}")
        graph.erase_node(n)


def _tag_fused(graph: fx.Graph, before: set, site: Site) -> None:
    """Tag the fused kernel node(s) this pair added like fxpasses' collectives (comm_volume reads the
    group size there for kernels that do not state it)."""
    for n in graph.nodes:
        if n not in before and gf.op_name(n) in FUSED_COLLECTIVES:
            gf.tag_node(n, collective=site.pair.collective, fused=gf.op_name(n), group=site.c10d_name,
                        group_size=site.size)


def _apply(graph: fx.Graph, backend: Backend, site: Site) -> fx.Node:
    before = set(graph.nodes)
    new = _apply_pair(graph, backend, site)
    _tag_fused(graph, before, site)
    return new


def _apply_pair(graph: fx.Graph, backend: Backend, site: Site) -> fx.Node:
    p = site.pair
    if p.kind != "all_gather_mm":
        with graph.inserting_before(p.head):
            new = backend.emit(graph, site)
        p.result.replace_all_uses_with(new)
        _erase(graph, p)
        return new
    order = _order(graph)
    users = [u for u in p.result.users if u is not p.unpad] + (
        [u for u in p.unpad.users] if p.unpad is not None else [])
    anchor = min(users, key=lambda u: order[u])
    for a in (p.ops.w_kn, p.ops.weight, p.ops.bias):
        _hoist(a, anchor, order)
    with graph.inserting_before(anchor):
        out, gathered = backend.emit(graph, site)
        if p.unpad is not None:
            t = p.unpad.args[3]
            out = call(graph, aten.slice.Tensor, (out, 0, 0, t), like=p.unpad)
            g_unpad = call(graph, aten.slice.Tensor, (gathered, 0, 0, t), like=p.unpad)
    p.matmul.replace_all_uses_with(out)
    if p.unpad is not None:
        p.unpad.replace_all_uses_with(g_unpad)
    p.result.replace_all_uses_with(gathered)
    _erase(graph, p)
    return out


def lower_graph(graph: fx.Graph, mode: str, ctx, *, module_prefix: str = "model",
                backend: Backend | str | None = None, weight_format: str = "unknown") -> dict:
    """Fuse every pair of `graph` the backend takes (in place, all or nothing); returns the record
    {"backend", "reason", "sites": [{prefix, pair, collective, group, op, reason}], "fused": {op: n}}.
    `backend` overrides the choice `mode` makes (tests drive the npu / cuda forms through it);
    `weight_format`: the configuration's (a possibly-NZ [N, K] platform weight is not fused on npu)."""
    if isinstance(backend, str):
        backend = BACKENDS[backend]
    why = f"backend {backend.name} (given)" if backend is not None else ""
    if backend is None:
        backend, why = choose(mode)
    rec = {"mode": mode, "backend": backend.name if backend else None, "reason": why, "sites": [], "fused": {}}
    if backend is None:
        return rec
    work = copy_graph(graph, graph.owning_module)
    fused: Counter = Counter()
    try:
        for pair in find_pairs(work):
            site = _site(pair, ctx, module_prefix, weight_format)
            entry = {"prefix": site.prefix if isinstance(site, Site) else _prefix(pair.matmul, module_prefix),
                     "pair": pair.kind, "collective": pair.collective, "group": pair.group, "op": None}
            refusal = site if isinstance(site, str) else (backend.no_op.get(pair.kind) or backend.refuse(site))
            if refusal is None and pair.ops.refused:
                refusal = pair.ops.refused
            if refusal:
                entry["reason"] = refusal
            else:
                _apply(work, backend, site)
                entry["op"] = backend.op_for(pair.kind)
                entry["reason"] = ""
                fused[entry["op"]] += 1
            rec["sites"].append(entry)
        work.lint()
    except Exception as e:  # the graph stays as it was; every site says why
        log.warning("fxpasses lowering (%s) abandoned, graph kept unfused: %s: %s", backend.name, type(e).__name__, e,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        for s in rec["sites"]:
            if s["op"]:
                s["op"], s["reason"] = None, f"lowering abandoned: {type(e).__name__}: {e}"
        rec["reason"] = f"lowering abandoned, graph kept unfused: {type(e).__name__}: {e}"
        return rec
    rec["fused"] = dict(fused)
    if fused:
        replace_graph_contents(graph, work)
    return rec


def text_lines(rec: dict) -> list[str]:
    """The lowering's lines of a site report."""
    if not rec or not rec.get("backend"):
        return []
    lines = [f"  lowering ({rec['backend']}): " + (", ".join(f"{k} x{v}" for k, v in rec["fused"].items())
                                                     or "nothing fused") + (f" [{rec['reason']}]" if rec["reason"] else "")]
    for s in rec["sites"]:
        lines.append(f"    {s['prefix']} {s['pair']}: " + (f"-> {s['op']}" if s["op"] else f"not fused: {s['reason']}"))
    return lines
