"""OTP: o_proj tensor parallel for DP-attention deployments (vllm-ascend's `OProjRowParallelOp`).

The original graph on every rank is the TP=1 graph: each rank runs attention on its own B tokens
with all heads and the full o_proj weight. K = `otp_size` (0 = world size); the OTP group is a block
of K consecutive ranks (`fxpasses.topology`); s = this rank's index in it. B must be the same on
every rank of the group (see `dp_common`).

Before (TP=1)::

    y = mm(x, w.T) (+ bias)                       # x [B, D], w [H, D]  -> y [B, H]

After::

    c  = x.view(B, K, D/K).permute(1, 0, 2)        # column block j of every token -> peer j
    a  = all_to_all_single(c.contiguous().view(K*B, D/K), otp)   # [K*B, D/K]: block s of every
                                                   #   peer's tokens, peer-major
    ws = w[:, s*D/K:(s+1)*D/K]                     # this rank's column slice, no communication
    o  = mm(a, ws.T) (+ bias on group rank 0 only) # [K*B, H], partial over the group
    y  = reduce_scatter(o, otp)                    # [B, H]: this rank's own tokens, summed

A quantised o_proj (W8A8: `npu.npu_quant_matmul(q, W int8 [D, H], scale [H], pertoken_scale=,
bias=)` after the graph's own `vllm.quantize` / `npu.npu_dynamic_quant` of x) sends int8 on the wire
(`int8_comm: auto`): the quantisation stays before the all_to_all, which moves q's column blocks;
dynamic W8A8 appends each token's float32 scale to every block as 4 more int8 columns
([B, K, D/K + 4]); this rank multiplies the received blocks with its int8 weight rows
[s*D/K, (s+1)*D/K) and dequantises with the full [H] scale and the received per-token scales. The
per-token scale is the TP=1 graph's (over all D features), so the K partial products sum to the
TP=1 result exactly, for static and dynamic W8A8 alike; the bias goes to group rank 0's partial.

The output is back in the original layout ([B, H], this rank's tokens), so nothing downstream
changes. That is also why OTP does not go through the layout engine's propagation: the collectives
it inserts are internal to the site (in: all_to_all of feature blocks; out: reduce_scatter of a
partial sum back to this rank's tokens) and no value outside the site changes layout, so there is
nothing to propagate (see `dp_common`). Skipped with the reason: packed weights (`_C.onednn_mm`), D not
divisible by K, non-2D inputs, a quantised form `dp_common.quant_site_refusal` refuses (`int8_comm: off`
included).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.context import TPContext
from fxpasses.site_records import SitePlan
from fxpasses.rewriter import LayoutRewriter, scale_columns, unpack_int8_scales
from fxpasses.strategies import dp_common as dc
from fxpasses.strategies.registry import register

NAME = "otp"
aten = torch.ops.aten


def _precheck(plan: SitePlan, rw: LayoutRewriter, ctx: TPContext, k: int) -> str | None:
    site = plan.site
    if site.kind != "row":
        return f"OTP rewrites row-parallel o_proj sites, not {site.kind} sites"
    why = dc.dp_precheck(site, ctx, rw.config.weight_format, quantized=True)
    if why:
        return why
    x = gf.val(site.input)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not rw.is_token_major(site.input):
        return "the o_proj input is not a [tokens, features] tensor"
    if dc.quantized_in_out(site.matmul) is not None:
        why = dc.quant_site_refusal(site, rw, "OTP")
        if why:
            return why
    elif dc.weight_val(site) is None or not dc.matmul_rhs_is_weight_t(site):
        return "the matmul does not read the weight as weight.T"
    dims = dc.out_in(site)
    d = dims[1] if dims is not None else None
    if not isinstance(d, int) or d % k:
        return f"o_proj input size {d} is not divisible by otp_size={k}"
    return None


def _send_blocks(g, t: fx.Node, B, k: int, dk: int) -> fx.Node:
    """[B, k*dk] -> [k*B, dk]: column block j of every token goes to peer j (peer-major)."""
    v = dc.tag(g.call_function(aten.view.default, (t, [B, k, dk])), "otp_view", NAME)
    p = dc.tag(g.call_function(aten.permute.default, (v, [1, 0, 2])), "otp_transpose", NAME)
    c = dc.tag(g.call_function(aten.clone.default, (p,), {"memory_format": torch.contiguous_format}),
               "otp_pack", NAME)
    return dc.tag(g.call_function(aten.view.default, (c, [dc.mul_node(g, B, k), dk])), "otp_send", NAME)


def _quant_site(rw: LayoutRewriter, site, xin_of, grp, B, dk: int) -> tuple[fx.Node, str]:
    """The quantised o_proj (`npu.npu_quant_matmul`, int8 [D, H] weight): the graph's quantisation of
    x stays before the all_to_all, which sends its int8 output. Dynamic: every block carries its
    token's float32 scale as 4 more int8 columns ([B, k, dk + 4]); the scale is per token over all D
    features, so each block's partial product dequantised with it sums to the TP=1 result exactly
    (the integer bias, if any, joins group rank 0's accumulator only). Returns (partial, wire)."""
    g, k, s, mm = rw.graph, grp.k, grp.rank, site.matmul
    form = dc.quantized_in_out(mm)
    q = xin_of(op_forms.arg(mm, form.x))
    pts = op_forms.arg(mm, form.token_args[0]) if form.token_args else None
    pts = pts if isinstance(pts, fx.Node) else None

    def mark(n, role):
        return dc.tag(n, role, NAME)

    if pts is None:
        recv, sg = rw.comm.all_to_all(g, _send_blocks(g, q, B, k, dk), grp.ref, B), None
        wire = "int8 all_to_all of the quantised input"
    else:
        s4 = scale_columns(g, pts, mark)                                                          # [B, 4]
        blocks = mark(g.call_function(aten.view.default, (q, [B, k, dk])), "otp_view")
        s4k = mark(g.call_function(aten.expand.default, (mark(g.call_function(aten.unsqueeze.default, (s4, 1)),
                                                                 "int8_pack"), [B, k, 4])), "int8_pack")
        packed = mark(g.call_function(aten.cat.default, ([blocks, s4k], 2)), "int8_pack")     # [B, k, dk + 4]
        flat = mark(g.call_function(aten.view.default, (packed, [B, k * (dk + 4)])), "int8_pack")
        recv = rw.comm.all_to_all(g, _send_blocks(g, flat, B, k, dk + 4), grp.ref, B)
        recv, sg = unpack_int8_scales(g, recv, dk, gf.val(pts).dim(), mark)
        wire = "int8 all_to_all of the quantised input + its per-token float32 scale per block (4 int8 columns)"
    ws = mark(g.call_function(aten.slice.Tensor, (site.weight, 0, s * dk, (s + 1) * dk)), "weight_slice")
    over = {form.x: recv, form.weight: ws}
    if form.bias:
        over[form.bias] = site.bias if s == 0 else None
    if sg is not None:
        over[form.token_args[0]] = sg
    return mark(op_forms.call_like(mm, g, **over), "matmul"), wire


class OProjTP(dc.DPAttentionStrategy):
    name = NAME
    aliases = ("oproj_tp", "o_proj_tp")
    size_key = "otp_size"
    site_kinds = frozenset({"row"})
    precedence = 30

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        return _precheck(plan, rw, ctx, self.prepare_groups(rw.config, ctx).k)

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        mine = self.mine(plans)
        if not mine:
            return
        grp = self.prepare_groups(rw.config, ctx)
        k, s, g = grp.k, grp.rank, rw.graph
        checked = rw.state(dc.TOKEN_CHECK_STATE).setdefault("groups", set())
        done_sites = []
        for plan in mine:
            why = _precheck(plan, rw, ctx, k)
            if why:
                plan.skip(why)
                continue
            site = plan.site
            mm, x, w = site.matmul, site.input, site.weight
            wv = dc.weight_val(site)
            dk = dc.out_in(site)[1] // k
            B = rw.token_count_node()
            where = f"o_proj TP at {site.prefix}"

            def xin_of(t):
                return dc.maybe_check_tokens(g, t, grp.ref, rw.config, checked, where, NAME)

            with g.inserting_before(mm):
                if dc.quantized_in_out(mm) is not None:
                    o, wire = _quant_site(rw, site, xin_of, grp, B, dk)
                    cols = f"int8 weight rows [{s * dk}, {(s + 1) * dk})"
                else:
                    recv = rw.comm.all_to_all(g, _send_blocks(g, xin_of(x), B, k, dk), grp.ref, B)
                    ws = dc.tag(g.call_function(aten.slice.Tensor, (w, 1, s * dk, (s + 1) * dk)), "weight_slice",
                                NAME)
                    o = dc.emit_matmul(g, recv, ws, site.bias if s == 0 else None, NAME)
                    wire, cols = "all_to_all", f"columns [{s * dk}, {(s + 1) * dk})"
                y = rw.comm.reduce_scatter(g, o, grp.ref)
            mm.replace_all_uses_with(y)
            g.erase_node(mm)
            plan.done(f"{wire} + matmul with {cols} + reduce_scatter over OTP group {list(grp.ref.ranks)}"
                      + (" (bias on group rank 0)" if site.bias is not None else ""))
            done_sites.append((site.prefix, dc.nbytes(wv)))
        if done_sites:
            note, extra = dc.resident_note(NAME, k, done_sites)
            rw.notes.append(note)
            rw.extra[NAME] = {**extra, "group": list(grp.ref.ranks), "equal_token_counts_required": True}


STRATEGY = register(OProjTP())
