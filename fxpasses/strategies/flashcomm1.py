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

from fxpasses import graph_forms as gf
from fxpasses.context import TPContext
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter

NAME = "flashcomm1"


def _group_matches(ar: gf.AllReduce, ctx: TPContext) -> bool:
    g = ctx.tp_group
    if ar.form == "shm":
        return True  # the shm all-reduce only exists on the TP/PP groups; the handle is the TP one here
    return ar.group_name in (g.c10d_name, g.vllm_name)


def precheck(plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
    """The reason this site cannot be rewritten, or None."""
    site = plan.site
    if site.kind in ("row", "embedding"):
        ar = site.all_reduce
        if ar is None:
            return "no TP all-reduce follows this layer (reduce_results=False or already rewritten)"
        if not _group_matches(ar, ctx):
            return f"its all-reduce runs on group {ar.group_name!r}, not the TP group"
        if not rw.is_token(ar.input):
            return "the all-reduced tensor's dim 0 is not the token dimension"
        return None
    if site.kind == "column":
        if site.matmul is None:
            return "no matmul found inside the layer"
        return None
    return f"FlashComm1 does not rewrite {site.kind} sites"


def rewrite(rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
    for plan in plans:
        if plan.strategy != NAME or plan.status != "planned":
            continue
        why = precheck(plan, rw, ctx)
        if why:
            plan.status, plan.reason = "skipped", why
            continue
        site = plan.site
        if site.kind == "column":
            rw.force_replicate.add(site.matmul)
        else:
            ar = site.all_reduce
            rs = rw.to_shard0_from_partial(ar.input)
            rw.replace_all_reduce(ar, rs)
        plan.status, plan.reason = "rewritten", ("all_reduce -> pad + reduce_scatter" if site.kind != "column"
                                                 else "input all_gather + unpad (Replicate) before the matmul")
