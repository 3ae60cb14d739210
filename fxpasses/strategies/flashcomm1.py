"""FlashComm1 / sequence parallelism over the TP group.

Before (vanilla TP, per layer)::

    h = all_reduce(o_proj(attn))                 # Partial -> Replicate, [T, H]
    h, res = fused_add_rms_norm(h, res)           # T rows on every rank
    y = all_reduce(down_proj(act(gate_up(h))))

After::

    h = reduce_scatter(pad(o_proj(attn)))         # Partial -> Shard0, [T_pad/tp, H]
    h, res = fused_add_rms_norm(h, res)           # T_pad/tp rows
    g = all_gather(h)[:T]                         # Shard0 -> Replicate before the column matmul
    y = reduce_scatter(pad(down_proj(act(gate_up(g)))))

Every TP all-reduce of the token stream becomes pad + reduce_scatter: row layers', the
embedding's, and the reduce sites (`fxpasses.sites`): the all-reduce that ends an MoE block
(routed experts plus the shared experts vLLM sums in before it) or a parallel-residual layer
(attention + MLP partials), after which the rest of the layer runs on shards. Column sites, fused
MoE experts and every other consumer of a rank-local value demand Replicate, so propagation
all-gathers + unpads their input, once per value; token-wise work whose every consumer demands
Replicate anyway (an MoE router next to its experts) runs on that gathered input instead of being
gathered itself (`LayoutRewriter.propagate`). Graph outputs: all_gather + unpad, except a piece's
token-sharded boundary (`fxpasses.piece_boundaries`): its input all-gather is taken back and its
output shard is the Shard0 value itself.
"""
from __future__ import annotations

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.context import TPContext
from fxpasses.site_records import SitePlan, SiteStatus
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies.interface import Strategy
from fxpasses.strategies.registry import register
from fxpasses.strategies.tp_family import TP_GRAPHS


class FlashComm1(Strategy):
    name = "flashcomm1"
    aliases = ("sp", "fc1", "sequence_parallel")
    family = TP_GRAPHS
    site_kinds = frozenset({"row", "column", "embedding", "reduce"})
    precedence = 10
    spans_layers = True

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        site = plan.site
        if site.kind in ("row", "embedding", "reduce"):
            ar = site.all_reduce
            if ar is None:
                return "no TP all-reduce follows this layer"
            if not ar.runs_on(ctx.tp_group):
                return f"its all-reduce runs on group {ar.group_name!r}, not the TP group"
            if not rw.is_token(ar.input):
                return f"the all-reduced tensor has no token dimension ({rw.token_dim_note(ar.input)})"
            return None
        if site.kind == "column":
            if site.matmul is None:
                return "no matmul found inside the layer"
            return None
        return f"FlashComm1 does not rewrite {site.kind} sites"

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        reducers = {p.site.all_reduce.nodes[0]: p.site.prefix for p in plans if p.site.all_reduce is not None}
        for plan in self.mine(plans):
            site = plan.site
            if site.kind == "row" and site.all_reduce is None and site.matmul is not None:
                by = _reduced_by(site.matmul, reducers)
                plan.leave("reduce_results=False: its partial sum is reduced " +
                           (f"by the all-reduce of {by}" if by else "nowhere in this graph"))
                continue
            why = self.precheck(plan, rw, ctx)
            if why:
                plan.skip(why)
            elif site.kind == "column":
                # nothing to insert: a column matmul is rank-local (TP-sharded weight), so propagation
                # already gives it Replicate input (all_gather + unpad of a Shard0 value)
                form = gf.platform_form(site.matmul, op_forms.Matmul)
                plan.done("input all_gather + unpad (Replicate) before the matmul"
                          + (f"; no int8 on the wire: {form.fused_quant}" if form is not None and form.fused_quant
                             else ""))
            else:
                rw.replace_all_reduce(site.all_reduce, rw.to_shard0_from_partial(site.all_reduce.input))
                plan.done("all_reduce -> pad + reduce_scatter")
        if any(p.strategy == self.name and p.status is SiteStatus.REWRITTEN for p in plans):
            taken = rw.adopt_boundary_gathers()
            if taken:
                rw.notes.append(f"{taken} token-sharded piece input(s) kept sharded (their boundary all-gather "
                                "moved to where all rows are needed)")
                rw.extra["boundary_gathers_taken"] = taken


    def after_propagation(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        """A column site counts as rewritten only where propagation gathered its input (at the
        matmul, or upstream where that moves fewer bytes)."""
        for plan in plans:
            mm = plan.site.matmul
            if (plan.strategy == self.name and plan.site.kind == "column" and plan.status is SiteStatus.REWRITTEN
                    and mm is not None and not rw.gathered_for(mm)):
                plan.leave("its input is Replicate where it is computed (never sharded, or gathered "
                           "upstream for a cheaper point): nothing to gather here")


def _reduced_by(node, reducers: dict, limit: int = 2000) -> str | None:
    """The site of the first all-reduce downstream of `node` (breadth first), or None."""
    seen, todo = {node}, [node]
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in reducers:
            return reducers[n]
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return None


STRATEGY = register(FlashComm1())
