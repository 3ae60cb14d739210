"""MLP-TP: dense MLP tensor parallel for DP-attention deployments (vllm-ascend's `MLPColumnParallelOp`
+ `MLPRowParallelOp`).

The original graph on every rank is the TP=1 graph (own B tokens, full weights). K = `mlp_tp_size`
(0 = world size); the MLP-TP group is K consecutive ranks (`fxpasses.topology`); s = this rank's
index in it; I = intermediate size, h = 2 halves (gate, up) for gated MLPs or 1 for plain ones.

Before (TP=1)::

    gu = mm(x, Wgu.T) (+ bgu)                      # x [B, H], Wgu [h*I, H] -> [B, h*I]
    a  = act(gu)                                   # e.g. SiluAndMul: silu(gu[:, :I]) * gu[:, I:]
    y  = mm(a, Wd.T) (+ bd)                        # Wd [H, I] -> [B, H]

After::

    g  = all_gather(x, mlp)                        # [K*B, H]: every group rank's tokens, rank-major
    W  = cat(Wgu[j*I + s*I/K : j*I + (s+1)*I/K] for j < h)    # gate rows and up rows sliced separately
    gu = mm(g, W.T) (+ the same slices of bgu)     # [K*B, h*I/K]
    a  = act(gu)                                   # the graph's own activation nodes, with their
                                                   #   feature constants I -> I/K, tokens B -> K*B
    o  = mm(a, Wd[:, s*I/K:(s+1)*I/K].T) (+ bd on group rank 0 only)   # [K*B, H], partial
    y  = reduce_scatter(o, mlp)                    # [B, H]: this rank's own tokens

Bias as vLLM's TP layers: the column bias is sharded like the rows, the row bias added once (rank 0).
Like OTP, MLP-TP enters and leaves each gate_up/down pair in the original layout ([B, H], this
rank's tokens): its all_gather and reduce_scatter are internal to the pair, so the layout engine's
propagation has nothing to carry (see `dp_common`).
Only dense gate_up_proj/down_proj pairs of one MLP module: routed experts (FusedMoE) are no linear
sites and `experts.` is excluded by the pattern set. The activation between the two matmuls must be
made of ops whose feature dimension can be re-sliced (pointwise ops, slices/splits of the last dim,
views, vLLM's `*_and_mul` ops, vllm-ascend's `npu.npu_swiglu`, a platform quantisation of down_proj's
input; `fxpasses.strategies.mlp_activation`); anything else leaves the pair untouched with the reason.

Quantised MLPs (W8A8, int8 on the wire). Both matmuls may instead be a quantised platform matmul
with an [in, out] int8 weight (`op_forms.Matmul` with `quantized`, `weight_layout="in_out"`:
vllm-ascend's `npu.npu_quant_matmul(q, W, scale, pertoken_scale=, bias=)`), whose input the graph
quantises before the layer (static `vllm.quantize` with per-input-channel vectors, or dynamic
`npu.npu_dynamic_quant`: int8 values and a float32 scale per token)::

    q, p = <the graph's quantisation of x>         # int8 [B, H], (dynamic) p float32 [B]; stays here
    g    = all_gather(q, mlp)                      # static: [K*B, H] int8
    g, p = unpack(all_gather(cat([q, p.view(int8)], 1), mlp))   # dynamic: ONE all_gather of
                                                   #   [B, H + 4] int8 (`rewriter.pack_int8_scales`)
    Wl   = cat(W[:, j*I + s*I/K : j*I + (s+1)*I/K] for j < h)   # int8 output columns of each half
    gu   = quant_matmul(g, Wl, <the same slices of scale>, pertoken_scale=p, bias=<same slices>)
    a    = act(gu)                                 # as above
    qa   = <the graph's quantisation of a>         # static: its per-channel scale / reciprocal /
                                                   #   offset [I] sliced to [s*I/K, (s+1)*I/K)
                                                   # dynamic: per token over this rank's I/K features
    o    = quant_matmul(qa, Wd[s*I/K:(s+1)*I/K], scale_d (full [H]), pertoken_scale=, bias on rank 0)
    y    = reduce_scatter(o, mlp)

Static W8A8 is exact: the gathered int8 values are the graph's, the per-channel quantisation of the
activation runs on the same values, sliced; only the order of down_proj's K partial sums differs.
Dynamic W8A8 quantises down_proj's input per token over this rank's I/K features, as vLLM's own TP
does per shard, instead of over all I: the result differs from the TP=1 graph by the quantisation
error only (per element at most sigma_t * scale_j * sum_i |Wd[i, j]|, sigma_t the TP=1 per-token
scale: each side's rounding error is at most half its scale, and a shard's scale is at most
sigma_t; tests/test_mlp_tp_int8.py measures <= 0.15 of that bound, ~2% of the output's magnitude).
The all_gather moves 1 byte per element (+ 4 bytes per token for dynamic scales) instead of 2 in bf16.
Skipped with the reason, on every rank alike (graph facts only): `int8_comm: off`; a weight the
platform may keep in its private layout (`op_forms.weight_block_refusal`, `weight_format`); an
output offset; a dequant scale that is not one per output channel; a per-token scale that is not
a float32 [tokens] tensor; an integer down_proj bias with a per-token scale (it would be scaled by
one shard's scale); a quantisation of down_proj's input with any other argument set than its
per-feature vectors; one matmul of the pair quantised and the other not.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.context import TPContext
from fxpasses.site_records import SitePlan
from fxpasses.rewriter import LayoutRewriter, pack_int8_scales, unpack_int8_scales
from fxpasses.sites import Site
from fxpasses.strategies import dp_common as dc
from fxpasses.strategies.registry import register
from fxpasses.strategies.mlp_activation import Analysis, Region, analyse

NAME = "mlp_tp"
aten = torch.ops.aten


def _parent(prefix: str) -> str:
    return prefix.rsplit(".", 1)[0] if "." in prefix else ""


def _pairs(mine: list[SitePlan]):
    """(gate_up plan, down plan) per MLP module; plans without a partner are marked skipped."""
    cols = {_parent(p.site.prefix): p for p in mine if p.site.kind == "column"}
    rows = {_parent(p.site.prefix): p for p in mine if p.site.kind == "row"}
    out = []
    for parent, c in cols.items():
        r = rows.get(parent)
        if r is None:
            c.skip(f"no down_proj in {parent!r} is owned by mlp_tp; MLP-TP rewrites pairs")
        else:
            out.append((c, r))
    for parent, r in rows.items():
        if parent not in cols:
            r.skip(f"no gate_up_proj in {parent!r} is owned by mlp_tp; MLP-TP rewrites pairs")
    return out


def _check_site(plan: SitePlan, ctx: TPContext, rw: LayoutRewriter) -> str | None:
    s = plan.site
    why = dc.dp_precheck(s, ctx, rw.config.weight_format, quantized=True)
    if why:
        return f"{s.prefix}: {why}"
    if dc.quantized_in_out(s.matmul) is not None:
        why = dc.quant_site_refusal(s, rw, "MLP-TP", shard_token_scale=s.kind == "row")
        return f"{s.prefix}: {why}" if why else None
    if not dc.matmul_rhs_is_weight_t(s):
        return f"{s.prefix}: the matmul does not read the weight as weight.T"
    return None


def _check_pair(cp: SitePlan, rp: SitePlan, rw: LayoutRewriter, ctx: TPContext, k: int, kT):
    """(reason, None) or (None, the accepted Analysis with its edits) for a gate_up/down pair."""
    cs, rs = cp.site, rp.site
    for p in (cp, rp):
        why = _check_site(p, ctx, rw)
        if why:
            return why, None
    quant = [dc.quantized_in_out(x.matmul) is not None for x in (cs, rs)]
    if quant[0] != quant[1]:
        return "one of gate_up_proj / down_proj is quantised and the other is not", None
    xv = gf.val(cs.input)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not rw.is_token_major(cs.input):
        return "the gate_up_proj input is not a [tokens, features] tensor", None
    gdims, ddims = dc.out_in(cs), dc.out_in(rs)
    if gdims is None or ddims is None:
        return "weights are not 2-D", None
    N, M = gdims[0], ddims[1]
    if not (isinstance(N, int) and isinstance(M, int)) or N % M or N // M not in (1, 2):
        return f"gate_up_proj has {N} output features and down_proj {M} input features: not a (gated) MLP", None
    if M % k:
        return f"intermediate size {M} is not divisible by mlp_tp_size={k}", None
    pts = _token_scale(rs.matmul) if quant[1] else None
    analysis = Analysis(Region(cs.matmul, rs.matmul, rs.input, (pts,) if pts is not None else ()),
                        rw.T, M, N // M, k, kT)
    why = analyse(analysis)
    if why:
        return why, None
    if pts is not None and pts not in analysis.region.nodes:
        return "down_proj's per-token scale is not computed from the MLP's activation", None
    return None, analysis


def _token_scale(mm: fx.Node) -> fx.Node | None:
    """The per-token scale of a quantised matmul (dynamic W8A8), or None (static)."""
    form = dc.quantized_in_out(mm)
    v = op_forms.arg(mm, form.token_args[0]) if form is not None and form.token_args else None
    return v if isinstance(v, fx.Node) else None


class MLPTP(dc.DPAttentionStrategy):
    name = NAME
    aliases = ("mlp", "mlptp")
    size_key = "mlp_tp_size"
    site_kinds = frozenset({"row", "column"})
    precedence = 40

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        """Per site; the pair's activation is checked in `rewrite` (MLP-TP rewrites pairs)."""
        return _check_site(plan, ctx, rw)

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        pairs = _pairs(self.mine(plans))
        if not pairs:
            return
        grp = self.prepare_groups(rw.config, ctx)
        kT = _tokens_times_k(rw, grp.k)
        done_sites = []
        for cp, rp in pairs:
            why, analysis = _check_pair(cp, rp, rw, ctx, grp.k, kT)
            if why:
                for p in (cp, rp):
                    p.skip(why)
                continue
            _rewrite_pair(rw, grp, cp, rp, analysis)
            done_sites += [(p.site.prefix, dc.nbytes(dc.weight_val(p.site))) for p in (cp, rp)]
        if done_sites:
            note, extra = dc.resident_note(NAME, grp.k, done_sites)
            rw.notes.append(note)
            rw.extra[NAME] = {**extra, "group": list(grp.ref.ranks), "equal_token_counts_required": True}


def _tokens_times_k(rw: LayoutRewriter, k: int):
    """K*T, defined once per graph right after T so every re-shaped buffer of the activation can
    use it (an int for a static T)."""
    state = rw.state(NAME)
    if state.get("kT") is None:
        T, g = rw.token_count_node(), rw.graph
        if not isinstance(T, fx.Node):
            state["kT"] = T * k
        else:
            where = T.next
            while where.op == "placeholder":
                where = where.next
            with g.inserting_before(where):
                state["kT"] = dc.tag(dc.mul_node(g, T, k), "tokens_times_k", NAME)
    return state["kT"]


def _halves(g: fx.Graph, M: int, lo: int, hi: int):
    """halves(t, dim, width, role): this rank's features [lo, hi) of each of the width // M halves
    of t along dim, side by side."""
    def halves(t: fx.Node, dim: int, width: int, role: str) -> fx.Node:
        parts = [dc.tag(g.call_function(aten.slice.Tensor, (t, dim, j * M + lo, j * M + hi)), role, NAME)
                 for j in range(width // M)]
        return parts[0] if len(parts) == 1 else dc.tag(g.call_function(aten.cat.default, (parts, dim)), role, NAME)
    return halves


def _rewrite_pair(rw: LayoutRewriter, grp, cp: SitePlan, rp: SitePlan, analysis) -> None:
    """One gate_up/down pair: all_gather the input over the MLP-TP group, this rank's gate/up rows,
    the activation on them, this rank's down columns, reduce_scatter back to the rank's tokens."""
    g, s, k, group = rw.graph, grp.rank, grp.k, list(grp.ref.ranks)
    checked = rw.state(dc.TOKEN_CHECK_STATE).setdefault("groups", set())
    M, h = analysis.M, analysis.h
    lo, hi = s * (M // k), (s + 1) * (M // k)
    cs, rs = cp.site, rp.site
    gu, dn = cs.matmul, rs.matmul
    quant = dc.quantized_in_out(gu) is not None
    halves = _halves(g, M, lo, hi)
    with g.inserting_before(gu):
        if quant:
            new_gu, wire = _quant_gate_up(rw, cs, grp, checked, f"MLP TP at {cs.prefix}", halves, M * h)
        else:
            xin = dc.maybe_check_tokens(g, cs.input, grp.ref, rw.config, checked, f"MLP TP at {cs.prefix}", NAME)
            gathered = rw.comm.all_gather(g, xin, grp.ref)
            b = halves(cs.bias, 0, M * h, "bias_slice") if cs.bias is not None else None
            new_gu = dc.emit_matmul(g, gathered, halves(cs.weight, 0, M * h, "weight_slice"), b, NAME)
    gu.replace_all_uses_with(new_gu)
    g.erase_node(gu)
    for node, pos, value in analysis.edits:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    for node, name, vec in analysis.channel_slices:
        with g.inserting_before(node):
            op_forms.set_arg(node, name, halves(vec, 0, int(gf.val(vec).shape[0]), "channel_slice"))
    with g.inserting_before(dn):
        o = _down(g, rs, (lo, hi), s, quant)
        y = rw.comm.reduce_scatter(g, o, grp.ref)
    dn.replace_all_uses_with(y)
    g.erase_node(dn)
    bias_note = " (bias on group rank 0)" if rs.bias is not None else ""
    if quant:
        cp.done(f"{wire} over MLP-TP group {group} + int8 weight columns [{lo}, {hi}) of each of {h} "
                "half(s), with their dequant scales" + (" and bias" if cs.bias is not None else ""))
        how = ("its input quantised per token over this rank's I/K features, as vLLM's TP does per shard"
               if _token_scale(o) is not None else
               "its input quantisation's per-channel vectors sliced to this rank's I/K channels"
               if analysis.channel_slices else "its input quantisation unchanged on this rank's I/K features")
        rp.done(f"int8 weight rows [{lo}, {hi}) + reduce_scatter over {group}{bias_note}; {how}")
    else:
        cp.done(f"all_gather over MLP-TP group {group} + gate/up rows [{lo}, {hi}) of each of {h} half(s)")
        rp.done(f"columns [{lo}, {hi}) + reduce_scatter over {group}{bias_note}")


def _down(g: fx.Graph, rs: Site, span: tuple[int, int], s: int, quant: bool) -> fx.Node:
    """down_proj on this rank's intermediate features [lo, hi): its weight's matching slice, the bias
    on group rank 0 only; a partial sum over the group."""
    dn, (lo, hi) = rs.matmul, span
    if quant:
        form = dc.quantized_in_out(dn)
        wd = dc.tag(g.call_function(aten.slice.Tensor, (rs.weight, 0, lo, hi)), "weight_slice", NAME)
        over = {form.weight: wd}
        if form.bias:
            over[form.bias] = rs.bias if s == 0 else None
        return dc.tag(op_forms.call_like(dn, g, **over), "matmul", NAME)
    wd = dc.tag(g.call_function(aten.slice.Tensor, (rs.weight, 1, lo, hi)), "weight_slice", NAME)
    return dc.emit_matmul(g, rs.input, wd, rs.bias if s == 0 else None, NAME)


def _quant_gate_up(rw: LayoutRewriter, cs: Site, grp, checked: set, where: str, halves, width: int):
    """The quantised gate_up_proj on all K*B tokens of the group: (new matmul, wire description).
    The graph's own quantisation of x stays before the all_gather, which moves its int8 output
    (dynamic: with the float32 per-token scales as 4 more int8 columns, `rewriter.pack_int8_scales`)."""
    g, gu = rw.graph, cs.matmul
    form = dc.quantized_in_out(gu)
    x = op_forms.arg(gu, form.x)
    pts = _token_scale(gu)
    xin = dc.maybe_check_tokens(g, x, grp.ref, rw.config, checked, where, NAME)

    def mark(n: fx.Node, role: str) -> fx.Node:
        return dc.tag(n, role, NAME)

    if pts is None:
        xg, sg = rw.comm.all_gather(g, xin, grp.ref), None
        wire = "int8 all_gather of the quantised input"
    else:
        ag = rw.comm.all_gather(g, pack_int8_scales(g, xin, pts, mark), grp.ref)
        xg, sg = unpack_int8_scales(g, ag, int(gf.val(x).shape[1]), gf.val(pts).dim(), mark)
        wire = "int8 all_gather of the quantised input + its per-token float32 scales (4 int8 columns)"
    w = halves(cs.weight, 1, width, "weight_slice")
    if gf.op_name(w) == "aten::slice":  # one half: a column block of [in, out] is strided, copy it (cat does)
        w = mark(g.call_function(aten.clone.default, (w,), {"memory_format": torch.contiguous_format}), "weight_slice")
    over = {form.x: xg, form.weight: w,
            form.channel_args[0]: halves(op_forms.arg(gu, form.channel_args[0]), 0, width, "scale_slice")}
    if form.bias:
        over[form.bias] = halves(cs.bias, 0, width, "bias_slice") if cs.bias is not None else None
    if sg is not None:
        over[form.token_args[0]] = sg
    return mark(op_forms.call_like(gu, g, **over), "matmul"), wire


STRATEGY = register(MLPTP())
