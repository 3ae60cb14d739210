"""The vanilla tensor-parallel graph family (`TP_GRAPHS`): what the pipeline needs to know of a
graph whose row layers end in a TP all-reduce of [T, ...] values - whether the rank can rewrite, its
token count, the group the LayoutRewriter pads over and the values that depend on TP-sharded
weights. FlashComm1 and FlashComm2 rewrite such graphs; `fxpasses.strategies.dp_common` is the
DP-attention family beside it.
"""
from __future__ import annotations

import torch

from fxpasses import graph_forms as gf
from fxpasses.errors import ConfigError
from fxpasses.site_records import TP_SHARDED_KINDS
from fxpasses.sites import unclassified_weight_matmuls
from fxpasses.strategies.interface import GraphFamily


class _TPGraphs(GraphFamily):
    """Vanilla tensor-parallel graphs: row layers end in a TP all-reduce of [T, ...] values."""

    name = "tp"

    def validate(self, config, tp, world):
        if tp <= 1:
            raise ConfigError(f"{'+'.join(config.strategies)} needs tensor parallelism, but tp={tp}; "
                              "run with tensor_parallel_size >= 2 or disable the strategy")

    def nothing_to_do(self, ctx):
        if ctx.tp < 2 or ctx.tp_group is None:
            return f"tp={ctx.tp}: nothing to rewrite"
        return None

    def token_count(self, plans):
        """The graph's token count T, read from the graph rather than assumed at dim 0: the size
        of the token ids entering the embedding ([T], or [1, T] for Transformers-backend models),
        else the first symbolic size (or dim 0) of the first owned all-reduced tensor."""
        for p in plans:
            if p.site.kind == "embedding" and p.site.input is not None:
                ids = gf.val(p.site.input)
                if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
                    sizes = [s for s in ids.shape if not (isinstance(s, int) and s == 1)]
                    return sizes[0] if sizes else ids.shape[0]
        for p in plans:
            ar = p.site.all_reduce
            if p.strategy and ar is not None:
                v = gf.val(ar.input)
                if isinstance(v, torch.Tensor) and v.dim() >= 1:
                    return next((s for s in v.shape if isinstance(s, torch.SymInt)), v.shape[0])
        return None

    def rewriter_group(self, ctx, config):
        return ctx.tp_group, ctx.rank

    def rank_local_values(self, plans):
        """Every TP-sharded site's matmul (or embedding), rewritten or not; every op of a fused MoE
        (its expert weights are sharded and hidden inside the op); and every matmul against a
        parameter that no site classifies (whatever cannot be classified may hold a TP shard, so
        it must see every token)."""
        out = []
        if plans:
            graph = plans[0].site.nodes[0].graph
            known = {p.site.matmul for p in plans if p.site.matmul is not None}
            out += [n for n in unclassified_weight_matmuls(graph) if n not in known]
        reduces = {n for p in plans if p.site.all_reduce is not None for n in p.site.all_reduce.nodes}
        for p in plans:
            site = p.site
            if site.kind == "moe":
                out += [n for n in site.nodes if n.op == "call_function" and n not in reduces]
            elif site.kind in TP_SHARDED_KINDS and site.matmul is not None:
                out.append(site.matmul)
        return out


TP_GRAPHS = _TPGraphs()


TP_GRAPHS = _TPGraphs()
