"""Find every linear site of a post-grad graph: prefix, layer class, kind and its nodes.

A site is one vLLM layer instance (RowParallelLinear, ColumnParallelLinear and its merged/QKV
forms, VocabParallelEmbedding, ReplicatedLinear), recognised from the `nn_module_stack` Dynamo
leaves on every node traced inside it. For each site we record its matmul (or embedding) node,
the activation entering it, the weight/bias where visible, and the TP all-reduce that follows.
Analysis only: nothing here mutates the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.patterns_loader import PatternSet


@dataclass
class Site:
    prefix: str                         # vLLM layer prefix, e.g. "model.layers.0.self_attn.o_proj"
    layer_class: str
    kind: str                           # row | column | embedding | replicated
    nodes: list[fx.Node] = field(default_factory=list)
    matmul: fx.Node | None = None       # mm/addmm/linear/onednn_mm (auto_functionalized) or embedding
    input: fx.Node | None = None        # activation entering the layer
    weight: fx.Node | None = None       # visible weight (placeholder) or None when packed/hidden
    bias: fx.Node | None = None
    all_reduce: gf.AllReduce | None = None

    @property
    def weight_visible(self) -> bool:
        return self.weight is not None

    def describe(self) -> dict:
        return {"prefix": self.prefix, "class": self.layer_class, "kind": self.kind,
                "matmul": self.matmul.name if self.matmul is not None else None,
                "all_reduce": (self.all_reduce.form if self.all_reduce else None)}


def _strip_view(n: fx.Node | None) -> fx.Node | None:
    """Follow permute/t/transpose back to the stored weight."""
    while isinstance(n, fx.Node) and gf.op_name(n) in ("aten::permute", "aten::t", "aten::transpose"):
        n = n.args[0]
    return n


def _matmul_operands(mm: fx.Node):
    """(activation, weight, bias) of a matmul node; weight None when hidden (packed)."""
    name = gf.op_name(mm)
    if name == "aten::mm":
        return mm.args[0], _strip_view(mm.args[1]), None
    if name == "aten::addmm":
        return mm.args[1], _strip_view(mm.args[2]), mm.args[0]
    if name == "aten::linear":
        return mm.args[0], mm.args[1], (mm.args[2] if len(mm.args) > 2 else mm.kwargs.get("bias"))
    if name in ("aten::matmul",):
        return mm.args[0], _strip_view(mm.args[1]), None
    if gf.is_auto_functionalized(mm):  # _C.onednn_mm(c, a, bias, handler_tensor): weight packed
        return mm.kwargs.get("a"), None, mm.kwargs.get("bias")
    if name.startswith("_C::"):
        return mm.args[1] if len(mm.args) > 1 else None, None, None
    return (mm.args[0] if mm.args else None), None, None


def find_sites(graph: fx.Graph, patterns: PatternSet, module_prefix: str = "") -> list[Site]:
    """All sites in graph order (order of their first node)."""
    by_path: dict[str, Site] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        last = gf.module_stack_last(node)
        if last is None:
            continue
        path, cls = last
        names = gf.class_names(cls)
        kind = patterns.kind_of(names)
        if kind is None:
            continue
        prefix = f"{module_prefix}.{path}" if module_prefix and path else (path or module_prefix)
        site = by_path.get(prefix)
        if site is None:
            site = by_path[prefix] = Site(prefix, names[0], kind)
        site.nodes.append(node)
    for site in by_path.values():
        for n in site.nodes:
            if site.matmul is None and (gf.is_matmul(n) or gf.op_name(n) in gf.EMBEDDING_OPS):
                site.matmul = n
            if site.all_reduce is None:
                ar = gf.match_all_reduce(n)
                if ar is not None:
                    site.all_reduce = ar
        if site.matmul is not None:
            if gf.op_name(site.matmul) in gf.EMBEDDING_OPS:
                site.weight, site.input = site.matmul.args[0], site.matmul.args[1]
            else:
                site.input, site.weight, site.bias = _matmul_operands(site.matmul)
    # nodes were appended in graph order, so each site's first node orders the sites
    return list(by_path.values())
