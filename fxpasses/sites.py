"""Find every site of a post-grad graph: prefix, layer class, kind and its nodes.

A layer site is one vLLM layer instance (RowParallelLinear, ColumnParallelLinear and its merged/QKV
forms, VocabParallelEmbedding, ReplicatedLinear, FusedMoE; subclasses included), recognised by
its class from the `nn_module_stack` Dynamo leaves on every node traced inside it; the pattern
set's `[overrides]` re-classify layers by prefix (a `MergedColumnParallelLinear(disable_tp=True)`
is replicated). For each we record its matmul (or embedding) node, the activation entering it, the
weight/bias where visible, and the all-reduce traced inside it.

A reduce site is an all-reduce that no layer site contains: the one that ends an MoE block
(routed + shared experts), a parallel-residual layer (attention + MLP) or any other sum of
`reduce_results=False` partials. It is named after the module the all-reduce was traced in, so
every all-reduce of a graph belongs to exactly one site and has its line in the site report.

Prefixes are normalised (`fxpasses.graph_forms.layer_prefix`): Dynamo's paths through globals and closures
(`G.__import_vllm_dot_forward_context._forward_context.no_compile_layers.<prefix>...`,
`....__closure__.0.cell_contents....`) become the vLLM prefix they stand for.
Analysis only: nothing here mutates the graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.patterns_loader import PatternSet
from fxpasses.site_records import Site


def _strip_view(n: fx.Node | None) -> fx.Node | None:
    """Follow permute/t/transpose back to the stored weight."""
    while isinstance(n, fx.Node) and gf.op_name(n) in ("aten::permute", "aten::t", "aten::transpose"):
        n = n.args[0]
    return n


def _matmul_operands(mm: fx.Node):
    """(activation, weight, bias) of a matmul node; weight None when hidden (packed). A platform
    matmul (`fxpasses.op_forms.Matmul`) names its operands in its record."""
    form = gf.platform_form(mm, op_forms.Matmul)
    if form is not None:
        return form.operands(mm)
    name = gf.op_name(mm)
    if name == "aten::mm":
        return mm.args[0], _strip_view(mm.args[1]), None
    if name == "aten::addmm":
        return mm.args[1], _strip_view(mm.args[2]), mm.args[0]
    if name == "aten::linear":
        return mm.args[0], mm.args[1], (mm.args[2] if len(mm.args) > 2 else mm.kwargs.get("bias"))
    if name in ("aten::matmul",):
        return mm.args[0], _strip_view(mm.args[1]), None
    if name.startswith("_C::"):
        return mm.args[1] if len(mm.args) > 1 else None, None, None
    return (mm.args[0] if mm.args else None), None, None


def _reads_parameter(n) -> bool:
    n = _strip_view(n)
    while isinstance(n, fx.Node) and gf.op_name(n) in ("aten::view", "aten::reshape", "aten::_unsafe_view",
                                                       "aten::clone", "aten::_to_copy", "aten::select",
                                                       "aten::slice", "aten::expand"):
        n = _strip_view(n.args[0])
    if not isinstance(n, fx.Node) or n.op not in ("placeholder", "get_attr"):
        return False
    v = gf.val(n)
    return isinstance(v, torch.Tensor) and v.dim() >= 2


def unclassified_weight_matmuls(graph: fx.Graph) -> list[fx.Node]:
    """Matmuls whose right operand is a parameter (a placeholder or attribute of rank >= 2, maybe
    transposed or viewed): the candidates for a TP-sharded contraction (callers drop the ones a
    site classifies)."""
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and gf.is_matmul(n):
            _, w, _ = _matmul_operands(n)
            if w is not None and _reads_parameter(w):
                out.append(n)
    return out


def find_sites(graph: fx.Graph, patterns: PatternSet, module_prefix: str = "") -> list[Site]:
    """All sites in graph order (order of their first node)."""
    by_path: dict[tuple[str, str], Site] = {}
    claimed: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        last = gf.module_stack_last(node)
        if last is None:
            continue
        path, cls = last
        names = gf.class_names(cls)
        prefix = gf.layer_prefix(module_prefix, path)
        kind = patterns.kind_of(names, prefix)
        if kind is None:
            continue
        site = by_path.get((prefix, kind))
        if site is None:
            site = by_path[(prefix, kind)] = Site(prefix, names[0], kind)
        site.nodes.append(node)
    for site in by_path.values():
        for n in site.nodes:
            if site.matmul is None and (gf.is_matmul(n) or gf.op_name(n) in gf.EMBEDDING_OPS):
                site.matmul = n
            if site.all_reduce is None and site.kind in ("row", "embedding"):
                ar = gf.match_all_reduce(n)
                if ar is not None:
                    site.all_reduce = ar
                    claimed.update(ar.nodes)
        if site.matmul is None:  # a post-grad rewrite may drop the matmul's module stack: the
            # matmul reading one of the layer's nodes (its weight's transpose) is the layer's
            site.matmul = next((u for n in site.nodes for u in n.users if gf.is_matmul(u)), None)
        if site.matmul is not None:
            if gf.op_name(site.matmul) in gf.EMBEDDING_OPS:
                site.weight, site.input = site.matmul.args[0], site.matmul.args[1]
            else:
                site.input, site.weight, site.bias = _matmul_operands(site.matmul)
    sites = list(by_path.values()) + _reduce_sites(graph, claimed, module_prefix)
    # nodes were appended in graph order, so each site's first node orders the sites
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(sites, key=lambda s: order[s.nodes[0]])


def _reduce_sites(graph: fx.Graph, claimed: set[fx.Node], module_prefix: str) -> list[Site]:
    """One site per all-reduce that no row/embedding site contains, named after its module."""
    out = []
    for node in graph.nodes:
        if node.op != "call_function" or node in claimed:
            continue
        ar = gf.match_all_reduce(node)
        if ar is None:
            continue
        last = gf.module_stack_last(node)
        path, cls = last if last is not None else (f"<graph>.{node.name}", "graph")
        out.append(Site(gf.layer_prefix(module_prefix, path), gf.class_names(cls)[0], "reduce", nodes=list(ar.nodes),
                        input=ar.input, all_reduce=ar))
    return out
