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
views, vLLM's `*_and_mul` ops; `fxpasses.strategies.mlp_activation`); anything else leaves the pair
untouched with the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.context import TPContext
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies import dp_common as dc
from fxpasses.strategies.base import register
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


def _check_site(plan: SitePlan, ctx: TPContext, weight_format: str = "unknown") -> str | None:
    s = plan.site
    why = dc.dp_precheck(s, ctx, weight_format)
    if why:
        return f"{s.prefix}: {why}"
    if not dc.matmul_rhs_is_weight_t(s):
        return f"{s.prefix}: the matmul does not read the weight as weight.T"
    return None


def _check_pair(cp: SitePlan, rp: SitePlan, rw: LayoutRewriter, ctx: TPContext, k: int, kT):
    """(reason, None) or (None, the accepted Analysis with its edits) for a gate_up/down pair."""
    cs, rs = cp.site, rp.site
    for p in (cp, rp):
        why = _check_site(p, ctx, rw.config.weight_format)
        if why:
            return why, None
    xv = gf.val(cs.input)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not rw.is_token(cs.input):
        return "the gate_up_proj input is not a [tokens, features] tensor", None
    wg, wd = dc.weight_val(cs), dc.weight_val(rs)
    if wg is None or wd is None:
        return "weights are not 2-D", None
    N, M = wg.shape[0], wd.shape[1]
    if not (isinstance(N, int) and isinstance(M, int)) or N % M or N // M not in (1, 2):
        return f"gate_up_proj has {N} output features and down_proj {M} input features: not a (gated) MLP", None
    if M % k:
        return f"intermediate size {M} is not divisible by mlp_tp_size={k}", None
    analysis = Analysis(Region(cs.matmul, rs.matmul, rs.input), rw.T, M, N // M, k, kT)
    why = analyse(analysis)
    if why:
        return why, None
    return None, analysis


class MLPTP(dc.DPAttentionStrategy):
    name = NAME
    aliases = ("mlp", "mlptp")
    size_key = "mlp_tp_size"
    site_kinds = frozenset({"row", "column"})
    precedence = 40

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        """Per site; the pair's activation is checked in `rewrite` (MLP-TP rewrites pairs)."""
        return _check_site(plan, ctx, rw.config.weight_format)

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        pairs = _pairs(self.mine(plans))
        if not pairs:
            return
        grp = self.prepare_groups(rw.config, ctx)
        k, s, g = grp.k, grp.rank, rw.graph
        checked = rw.state(dc.TOKEN_CHECK_STATE).setdefault("groups", set())
        T = rw.token_count_node()
        state = rw.state(NAME)
        kT = state.get("kT")
        if kT is None:
            # K*T, defined right after T so every re-shaped buffer of the activation can use it
            anchor = T if isinstance(T, fx.Node) else None
            if anchor is None:
                kT = T * k
            else:
                where = anchor.next
                while where.op == "placeholder":
                    where = where.next
                with g.inserting_before(where):
                    kT = dc.tag(dc.mul_node(g, T, k), "tokens_times_k", NAME)
            state["kT"] = kT
        done_sites = []
        for cp, rp in pairs:
            why, analysis = _check_pair(cp, rp, rw, ctx, k, kT)
            if why:
                for p in (cp, rp):
                    p.skip(why)
                continue
            M, h = analysis.M, analysis.h
            ml = M // k
            cs, rs = cp.site, rp.site
            gu, dn = cs.matmul, rs.matmul
            with g.inserting_before(gu):
                xin = dc.maybe_check_tokens(g, cs.input, grp.ref, rw.config, checked, f"MLP TP at {cs.prefix}", NAME)
                gathered = rw.comm.all_gather(g, xin, grp.ref)
                parts = [dc.tag(g.call_function(aten.slice.Tensor, (cs.weight, 0, j * M + s * ml, j * M + (s + 1) * ml)),
                                "weight_slice", NAME) for j in range(h)]
                w = parts[0] if h == 1 else dc.tag(g.call_function(aten.cat.default, (parts, 0)), "weight_slice", NAME)
                b = None
                if cs.bias is not None:
                    bp = [dc.tag(g.call_function(aten.slice.Tensor, (cs.bias, 0, j * M + s * ml, j * M + (s + 1) * ml)),
                                 "bias_slice", NAME) for j in range(h)]
                    b = bp[0] if h == 1 else dc.tag(g.call_function(aten.cat.default, (bp, 0)), "bias_slice", NAME)
                new_gu = dc.emit_matmul(g, gathered, w, b, NAME)
            gu.replace_all_uses_with(new_gu)
            g.erase_node(gu)
            for node, pos, value in analysis.edits:
                args = list(node.args)
                args[pos] = value
                node.args = tuple(args)
            with g.inserting_before(dn):
                wd = dc.tag(g.call_function(aten.slice.Tensor, (rs.weight, 1, s * ml, (s + 1) * ml)), "weight_slice", NAME)
                o = dc.emit_matmul(g, rs.input, wd, rs.bias if s == 0 else None, NAME)
                y = rw.comm.reduce_scatter(g, o, grp.ref)
            dn.replace_all_uses_with(y)
            g.erase_node(dn)
            group = list(grp.ref.ranks)
            cp.done(f"all_gather over MLP-TP group {group} + gate/up rows [{s * ml}, {(s + 1) * ml}) of each of "
                    f"{h} half(s)")
            rp.done(f"columns [{s * ml}, {(s + 1) * ml}) + reduce_scatter over {group}"
                    + (" (bias on group rank 0)" if rs.bias is not None else ""))
            done_sites += [(cs.prefix, dc.nbytes(dc.weight_val(cs))), (rs.prefix, dc.nbytes(dc.weight_val(rs)))]
        if done_sites:
            note, extra = dc.resident_note(NAME, k, done_sites)
            rw.notes.append(note)
            rw.extra[NAME] = {**extra, "group": list(grp.ref.ranks), "equal_token_counts_required": True}


STRATEGY = register(MLPTP())
