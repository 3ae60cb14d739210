"""The comm-backend seam: the one place that emits collective nodes into a graph.

`CommBackend.for_forms(forms)` (the forms of the graph's TP all-reduces) mirrors the form the traced graph already uses: vLLM's custom ops
(`vllm.reduce_scatter` / `vllm.all_gather`) where the graph's TP all-reduce is `vllm.all_reduce`
and the vLLM group exists, torch's functional collectives (`_c10d_functional.*` + `wait_tensor`)
otherwise, and always for all_to_all (vLLM has none). Every emitted node is tagged
`meta["fxpasses"]` so reports and fingerprints can tell our collectives from the model's.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.context import GroupRef

c10d = torch.ops._c10d_functional


class CommBackend:
    def __init__(self, use_vllm_ops: bool):
        self.use_vllm_ops = use_vllm_ops

    @classmethod
    def for_forms(cls, forms: set[str], mode: str = "auto") -> "CommBackend":
        if mode == "vllm":
            return cls(True)
        if mode == "c10d":
            return cls(False)
        return cls(forms == {"vllm"} and hasattr(torch.ops, "vllm") and hasattr(torch.ops.vllm, "reduce_scatter"))

    @staticmethod
    def _tag(node: fx.Node, what: str, group: GroupRef) -> fx.Node:
        return gf.tag_node(node, collective=what, group=group.label, group_size=group.size)

    def _wait(self, graph: fx.Graph, n: fx.Node, what: str, group: GroupRef) -> fx.Node:
        self._tag(n, what, group)
        return self._tag(graph.call_function(c10d.wait_tensor.default, (n,)), what + "_wait", group)

    def reduce_scatter(self, graph: fx.Graph, x: fx.Node, group: GroupRef) -> fx.Node:
        if self.use_vllm_ops and group.vllm_name:
            return self._tag(graph.call_function(torch.ops.vllm.reduce_scatter.default,
                                                 (x, 0, group.size, group.vllm_name)), "reduce_scatter", group)
        n = graph.call_function(c10d.reduce_scatter_tensor.default, (x, "sum", group.size, group.c10d_name))
        return self._wait(graph, n, "reduce_scatter", group)

    def all_gather(self, graph: fx.Graph, x: fx.Node, group: GroupRef) -> fx.Node:
        if self.use_vllm_ops and group.vllm_name:
            return self._tag(graph.call_function(torch.ops.vllm.all_gather.default,
                                                 (x, 0, group.size, group.vllm_name)), "all_gather", group)
        n = graph.call_function(c10d.all_gather_into_tensor.default, (x, group.size, group.c10d_name))
        return self._wait(graph, n, "all_gather", group)

    def all_to_all(self, graph: fx.Graph, x: fx.Node, group: GroupRef, chunk) -> fx.Node:
        """Equal splits along dim 0: every rank sends and receives `chunk` rows (an int or a SymInt
        node) to/from each group member, so x.shape[0] == chunk * group.size."""
        splits = [chunk] * group.size
        n = graph.call_function(c10d.all_to_all_single.default, (x, splits, list(splits), group.c10d_name))
        return self._wait(graph, n, "all_to_all", group)

    def all_reduce(self, graph: fx.Graph, x: fx.Node, group: GroupRef) -> fx.Node:
        if self.use_vllm_ops and group.vllm_name:
            return self._tag(graph.call_function(torch.ops.vllm.all_reduce.default, (x, group.vllm_name)),
                             "all_reduce", group)
        n = graph.call_function(c10d.all_reduce.default, (x, "sum", group.c10d_name))
        return self._wait(graph, n, "all_reduce", group)
