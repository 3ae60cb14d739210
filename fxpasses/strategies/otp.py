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

The output is back in the original layout ([B, H], this rank's tokens), so nothing downstream
changes. That is also why OTP does not go through the layout engine's propagation: the collectives
it inserts are internal to the site (in: all_to_all of feature blocks; out: reduce_scatter of a
partial sum back to this rank's tokens) and no value outside the site changes layout, so there is
nothing to propagate (see `dp_common`). Skipped with the reason: packed weights (`_C.onednn_mm`), D not divisible by K, non-2D inputs.
"""
from __future__ import annotations

import torch

from fxpasses import graph_forms as gf
from fxpasses.context import TPContext
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies import dp_common as dc
from fxpasses.strategies.base import register

NAME = "otp"
aten = torch.ops.aten


def _precheck(plan: SitePlan, rw: LayoutRewriter, ctx: TPContext, k: int) -> str | None:
    site = plan.site
    if site.kind != "row":
        return f"OTP rewrites row-parallel o_proj sites, not {site.kind} sites"
    why = dc.dp_precheck(site, ctx, rw.config.weight_format)
    if why:
        return why
    x, w = gf.val(site.input), dc.weight_val(site)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not rw.is_token(site.input):
        return "the o_proj input is not a [tokens, features] tensor"
    if w is None or not dc.matmul_rhs_is_weight_t(site):
        return "the matmul does not read the weight as weight.T"
    d = w.shape[1]
    if not isinstance(d, int) or d % k:
        return f"o_proj input size {d} is not divisible by otp_size={k}"
    return None


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
            d = wv.shape[1]
            dk = d // k
            B = rw.token_count_node()
            with g.inserting_before(mm):
                xin = dc.maybe_check_tokens(g, x, grp.ref, rw.config, checked, f"o_proj TP at {site.prefix}", NAME)
                v = dc.tag(g.call_function(aten.view.default, (xin, [B, k, dk])), "otp_view", NAME)
                p = dc.tag(g.call_function(aten.permute.default, (v, [1, 0, 2])), "otp_transpose", NAME)
                c = dc.tag(g.call_function(aten.clone.default, (p,), {"memory_format": torch.contiguous_format}),
                           "otp_pack", NAME)
                kb = dc.mul_node(g, B, k)
                send = dc.tag(g.call_function(aten.view.default, (c, [kb, dk])), "otp_send", NAME)
                recv = rw.comm.all_to_all(g, send, grp.ref, B)
                ws = dc.tag(g.call_function(aten.slice.Tensor, (w, 1, s * dk, (s + 1) * dk)), "weight_slice", NAME)
                bias = site.bias if s == 0 else None
                o = dc.emit_matmul(g, recv, ws, bias, NAME)
                y = rw.comm.reduce_scatter(g, o, grp.ref)
            mm.replace_all_uses_with(y)
            g.erase_node(mm)
            plan.done(f"all_to_all + matmul with columns [{s * dk}, {(s + 1) * dk}) + reduce_scatter over "
                      f"OTP group {list(grp.ref.ranks)}" + (" (bias on group rank 0)" if site.bias is not None else ""))
            done_sites.append((site.prefix, dc.nbytes(wv)))
        if done_sites:
            note, extra = dc.resident_note(NAME, k, done_sites)
            rw.notes.append(note)
            rw.extra[NAME] = {**extra, "group": list(grp.ref.ranks), "equal_token_counts_required": True}


STRATEGY = register(OProjTP())
