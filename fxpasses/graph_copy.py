"""The transaction of a pass: the rewrite runs on a copy of the graph (`copy_graph`); only a copy
that verifies replaces the original's contents (`replace_graph_contents`), so a failure leaves the
graph Inductor holds exactly as it was."""
from __future__ import annotations

import torch.fx as fx


def copy_graph(graph: fx.Graph, owning_module=None) -> fx.Graph:
    g = fx.Graph(owning_module=owning_module)
    out = g.graph_copy(graph, {})
    g.output(out)
    return g


# the private fields that make up an fx.Graph's node list (torch is pinned; checked before use)
_GRAPH_NODE_STATE = ("_root", "_used_names", "_insert", "_len", "_graph_namespace", "_find_nodes_lookup_table")


def replace_graph_contents(dst: fx.Graph, src: fx.Graph) -> None:
    """Make `dst` (the object Inductor holds) contain `src`'s nodes; `src` is left empty.

    The nodes are moved, not copied (a copy of an 80-layer graph costs about half a second here):
    the node list, name tables and lookup table pass to `dst` and every node is re-pointed at it.
    If this torch's Graph does not have the expected fields, the nodes are copied instead."""
    if all(hasattr(g, a) for g in (dst, src) for a in _GRAPH_NODE_STATE):
        for a in _GRAPH_NODE_STATE:
            setattr(dst, a, getattr(src, a))
        for n in (dst._root, *dst.nodes):
            object.__setattr__(n, "graph", dst)  # Node.__setattr__ would consult the old lookup table
        fx.Graph.__init__(src, owning_module=None)
        return
    for n in reversed(list(dst.nodes)):
        dst.erase_node(n)
    dst._graph_namespace = type(dst._graph_namespace)()  # reuse the original node names
    out = dst.graph_copy(src, {})
    dst.output(out)
