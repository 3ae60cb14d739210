"""Where to gather: the fewest bytes between token-sharded values and the nodes that need them whole.

The layout rewriter propagates Shard0 forward; a node that cannot run on shards (a column matmul,
attention, an unknown op, the graph output: a *demand*) needs its inputs Replicate, so some value
upstream of it is all-gathered. Which one is a choice: a token-wise node whose every consumer
demands Replicate (a *candidate*, e.g. the norm in front of a column matmul, a dtype cast, an MoE
router next to its experts) may run on all tokens after a gather of its inputs, or on shards with
its output gathered. Choosing node by node goes wrong as soon as widths change along the way: a
bfloat16 norm computes in float32 and casts back, so each float32 step looks cheaper to gather
before than after, and the greedy gathers the residual and the hidden state (two bf16 rows) where
the norm's bf16 output (one row) was enough.

So the choice is made once, for the whole graph, as a minimum cut (the same tool Inductor's
min-cut rematerialisation partitioner uses, networkx's max-flow): every value that may be sharded
is a vertex whose capacity is its row bytes (the bytes per token of its gather); source edges feed
the sharded values that are not candidates, sink edges leave every value a demand reads; a
candidate's inputs are joined to it by uncuttable edges. A cut is then exactly a set of gathered
values that separates every demand from the shards, and its capacity is their bytes per token (a
consumer left on shards behind a candidate run on all tokens takes its rows by a local slice: free). Of
the minimum cuts the one nearest the sink is taken (most work stays on shards). Values with several
outputs (a fused norm's tuple) and values of unknown row size are never cut, so they are never
gathered themselves: a getitem of a tuple runs on all tokens only when the tuple does.

Pure analysis over the graph and two callbacks; no graph mutation.
"""
from __future__ import annotations

from typing import Callable, Iterable

import networkx as nx
import torch.fx as fx

_SOURCE, _SINK = ("source",), ("sink",)


def replicated_candidates(graph: fx.Graph, candidates: set[fx.Node], demands: set[fx.Node],
                          sharded: set[fx.Node], forced: Iterable[fx.Node],
                          row_bytes: Callable[[fx.Node], float]) -> set[fx.Node]:
    """The candidates that should run on Replicate inputs (all tokens) so that the bytes gathered
    per token are the fewest.

    `candidates`: token-wise nodes whose every consumer is a demand or a candidate; `demands`: nodes
    that take Replicate inputs whatever is decided; `sharded`: every value that is Shard0 when
    computed on shards (the forward closure of the strategies' Shard0 values through token-wise
    nodes); `forced`: candidates that must run on Replicate inputs (a quantisation with int8
    communication off); `row_bytes(n)`: bytes per token of n's value (inf when unknown)."""
    net = nx.DiGraph()
    region = [n for n in graph.nodes if n in candidates and n in sharded]
    if not region:
        return set()
    in_region = set(region)

    def vertex(n: fx.Node) -> None:
        cap = float("inf") if isinstance(n.meta.get("val"), (list, tuple)) else row_bytes(n)
        if cap == float("inf"):
            net.add_edge(("in", n), ("out", n))          # uncuttable: never gathered itself
        else:
            net.add_edge(("in", n), ("out", n), capacity=int(cap))
        if any(u in demands for u in n.users):
            net.add_edge(("out", n), _SINK)              # a demand reads it whole

    for c in region:
        vertex(c)
        for a in c.all_input_nodes:
            if a not in sharded or (a not in in_region and any(u in demands for u in a.users)):
                continue                                 # Replicate already, or gathered anyway: free
            if a not in in_region and ("in", a) not in net:
                vertex(a)
                net.add_edge(_SOURCE, ("in", a))         # computed on shards whatever is decided
            net.add_edge(("out", a), ("in", c))          # c on all tokens needs a whole
    for f in forced:
        if f in in_region:
            net.add_edge(("in", f), _SINK)
    if _SINK not in net:
        return set()
    net.add_node(_SOURCE)  # without a source edge every input is free: the whole region runs on all tokens
    # the minimum cut nearest the sink: networkx's sink side is what still reaches the sink in the
    # residual network, the smallest sink side of all minimum cuts
    try:
        _, (_, sink_side) = nx.minimum_cut(net, _SOURCE, _SINK)
    except nx.NetworkXUnbounded:  # only values of unknown row size in between: gather at the demands
        return set()
    return {c for c in region if ("in", c) in sink_side}
