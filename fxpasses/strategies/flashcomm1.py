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

Row sites and the embedding: all_reduce -> pad + reduce_scatter. Column sites: their matmul
demands Replicate, so propagation all-gathers + unpads its input. Graph outputs: all_gather + unpad.
"""
from __future__ import annotations

from fxpasses.context import TPContext
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies.base import Strategy, register


class FlashComm1(Strategy):
    name = "flashcomm1"
    aliases = ("sp", "fc1", "sequence_parallel")
    site_kinds = frozenset({"row", "column", "embedding"})
    precedence = 10

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        site = plan.site
        if site.kind in ("row", "embedding"):
            ar = site.all_reduce
            if ar is None:
                return "no TP all-reduce follows this layer (reduce_results=False or already rewritten)"
            if not ar.runs_on(ctx.tp_group):
                return f"its all-reduce runs on group {ar.group_name!r}, not the TP group"
            if not rw.is_token(ar.input):
                return "the all-reduced tensor's dim 0 is not the token dimension"
            return None
        if site.kind == "column":
            if site.matmul is None:
                return "no matmul found inside the layer"
            return None
        return f"FlashComm1 does not rewrite {site.kind} sites"

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        for plan in self.mine(plans):
            why = self.precheck(plan, rw, ctx)
            if why:
                plan.skip(why)
                continue
            site = plan.site
            if site.kind == "column":
                # nothing to insert: a column matmul is rank-local (TP-sharded weight), so propagation
                # already gives it Replicate input (all_gather + unpad of a Shard0 value)
                plan.done("input all_gather + unpad (Replicate) before the matmul")
            else:
                rw.replace_all_reduce(site.all_reduce, rw.to_shard0_from_partial(site.all_reduce.input))
                plan.done("all_reduce -> pad + reduce_scatter")


STRATEGY = register(FlashComm1())
