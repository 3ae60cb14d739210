"""MLP-TP's activation analysis: can the ops between gate_up_proj and down_proj run on a slice of
the intermediate features, and which constants change when they do?

The region is the set of nodes on every path from the gate_up matmul to down_proj's input (and to
its other token inputs: a quantised down_proj's per-token scale). Each op in it is looked up in
`HANDLERS` (op name -> handler), then three fallbacks: a platform quantisation of down_proj's input
(`fxpasses.op_forms` TokenWise records with `quantizes`, `quantize`), vLLM's activation ops
(`*_and_mul`, also inside auto_functionalized) and aten pointwise ops. A handler returns the reason
the op cannot be re-sliced, or None after recording its edits (`Analysis.edits`: node, argument
position, new value): feature constants I -> I/K (gate/up boundaries kept, per half), token sizes
T -> K*T; and the per-feature vectors to slice to this rank's features (`Analysis.channel_slices`:
a static quantisation's scale / reciprocal / offset [I] -> [I/K], which keeps it exact, value for
value). Nothing is edited unless the whole region is accepted (`MLPTP.rewrite` applies the edits).
Handlers are plain functions of (analysis, node) and can be tested alone on a tiny graph.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses.tokenwise import is_pointwise, is_quantize, registrar

ALLOC_OPS = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::full", "aten::ones"}
ACTIVATION_SUFFIXES = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "mul_and_silu", "fatrelu_and_mul",
                       "swigluoai_and_mul", "gelu_new", "gelu_fast", "gelu_quick", "relu2")


class Region:
    """The activation nodes between the gate_up matmul and the down_proj input (and `extra`: other
    token inputs of down_proj, e.g. the per-token scale of its quantised input)."""

    def __init__(self, gu: fx.Node, dn: fx.Node, dn_in: fx.Node, extra: tuple[fx.Node, ...] = ()):
        self.gu, self.dn, self.dn_in = gu, dn, dn_in
        down = set()
        stack = [gu]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is not dn and u not in down:
                    down.add(u)
                    stack.append(u)
        up = set()
        stack = [dn_in, *extra]
        while stack:
            n = stack.pop()
            if n in up or n is gu:
                continue
            up.add(n)
            stack.extend(n.all_input_nodes)
        self.nodes = down & up


class Analysis:
    """One gate_up/down pair: M = intermediate size, h = halves (2 gated, 1 plain), K = group size,
    `T` the graph's token count and `kT` the value (int or node) of K*T."""

    def __init__(self, region: Region, T, M: int, h: int, k: int, kT):
        self.region, self.T, self.M, self.h, self.k, self.kT = region, T, M, h, k, kT
        self.N, self.ml = h * M, M // k
        self.inside = region.nodes | {region.gu}
        self.edits: list[tuple[fx.Node, int, object]] = []
        # (node, schema argument name, [f] vector): slice to this rank's features of each half
        self.channel_slices: list[tuple[fx.Node, str, fx.Node]] = []

    def map_col(self, c):
        """A feature offset in the full [0, h*M) range -> the same boundary in the sliced one."""
        if isinstance(c, int) and c >= self.N:
            return c          # "to the end"
        if isinstance(c, int) and c >= 0 and c % self.M == 0:
            return (c // self.M) * self.ml
        return None

    def is_T(self, e) -> bool:
        return (isinstance(e, fx.Node) and gf.same_size(gf.val(e), self.T)) or \
            (isinstance(e, int) and isinstance(self.T, int) and e == self.T)

    def map_shape(self, shape, what):
        """([K*T, f/K-ish] or None, reason) for a [tokens, features] shape argument."""
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            return None, f"{what} has shape {shape}; only [tokens, features] is supported"
        t, f = shape
        if not (self.is_T(t) or t == -1):
            return None, f"{what}: dim 0 {t} is not the token count"
        if f == -1:
            return [self.kT if t != -1 else -1, -1], None
        if not (isinstance(f, int) and 0 < f <= self.N and f % self.M == 0):
            return None, f"{what}: feature size {f} cannot be re-sliced"
        return [self.kT if t != -1 else -1, f // self.M * self.ml], None

    def is_last_dim(self, src, dim) -> bool:
        v = gf.val(src)
        return isinstance(v, torch.Tensor) and dim % v.dim() == v.dim() - 1


Handler = Callable[[Analysis, fx.Node], "str | None"]
HANDLERS: dict[str, Handler] = {}
handles = registrar(HANDLERS)  # register a handler for the given op names


def _nothing(a: Analysis, n: fx.Node) -> str | None:
    return None


def activation(a: Analysis, n: fx.Node) -> str | None:
    """vLLM's `*_and_mul` ops: accepted; their output buffers (allocated in the graph) re-shaped."""
    name = gf.op_name(n)
    if not name.split("::")[-1].endswith(ACTIVATION_SUFFIXES):
        return f"op {name} between gate_up_proj and down_proj is not a known activation"
    for x in n.all_input_nodes:
        if x in a.inside:
            continue
        xn = gf.op_name(x)
        if xn not in ALLOC_OPS:
            return f"activation {name} reads {x.name} ({xn}) from outside the MLP"
        if any(u not in a.region.nodes for u in x.users):
            return f"buffer {x.name} of {name} is shared with other ops"
        shp, why = a.map_shape(x.args[0], f"buffer {x.name}")
        if why:
            return why
        a.edits.append((x, 0, shp))
    return None


@handles("aten::slice")
def feature_slice(a: Analysis, n: fx.Node) -> str | None:
    dim = n.args[1] if len(n.args) > 1 else 0
    v = gf.val(n)
    if not isinstance(v, torch.Tensor) or dim % v.dim() != v.dim() - 1:
        return f"{n.name} slices dim {dim}, not the feature dim"
    for pos in (2, 3):
        c = n.args[pos] if len(n.args) > pos else None
        if c is None:
            continue
        c2 = a.map_col(c)
        if c2 is None:
            return f"{n.name} slices the feature dim at {c}, not at a gate/up boundary"
        a.edits.append((n, pos, c2))
    if len(n.args) > 4 and n.args[4] != 1:
        return f"{n.name} is a strided slice"
    return None


@handles("aten::split_with_sizes", "aten::split")
def feature_split(a: Analysis, n: fx.Node) -> str | None:
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    if not a.is_last_dim(n.args[0], dim):
        return f"{n.name} splits dim {dim}, not the feature dim"
    sz, M = n.args[1], a.M
    if isinstance(sz, (list, tuple)):
        if not all(isinstance(z, int) and z % M == 0 for z in sz):
            return f"{n.name} splits the features as {sz}, not at gate/up boundaries"
        a.edits.append((n, 1, [z // M * a.ml for z in sz]))
    else:
        if not (isinstance(sz, int) and sz % M == 0):
            return f"{n.name} splits the features by {sz}"
        a.edits.append((n, 1, sz // M * a.ml))
    return None


@handles("aten::chunk")
def feature_chunk(a: Analysis, n: fx.Node) -> str | None:
    dim = n.args[2] if len(n.args) > 2 else 0
    if not a.is_last_dim(n.args[0], dim):
        return f"{n.name} chunks dim {dim}, not the feature dim"
    return None


@handles("aten::view", "aten::reshape", "aten::_unsafe_view")
def view(a: Analysis, n: fx.Node) -> str | None:
    shp, why = a.map_shape(n.args[1], n.name)
    if why:
        return why
    a.edits.append((n, 1, shp))
    return None


@handles("npu::npu_swiglu")
def swiglu(a: Analysis, n: fx.Node) -> str | None:
    """vllm-ascend's gated activation: silu(first half) * second half along `dim`; each rank's input
    holds its gate slice then its up slice, so it runs unchanged on the last dim."""
    form = gf.platform_form(n, op_forms.TokenWise)
    dim = op_forms.arg(n, form.dim_arg) if form is not None and form.dim_arg else -1
    if not a.is_last_dim(n.args[0], dim if isinstance(dim, int) else 0):
        return f"{n.name} gates along dim {dim}, not the feature dim"
    return None


def quantize(a: Analysis, n: fx.Node) -> str | None:
    """A platform quantisation of down_proj's input (`op_forms.TokenWise` with `quantizes`): its
    token inputs come from the activation, its per-feature vectors (`channel_args`) are sliced with
    the features (a static scheme stays exact) or broadcast ([1]); any other tensor argument set
    (an MoE group index, ...) is refused. A dynamic per-token scheme then quantises over this
    rank's I/K features (see `fxpasses.strategies.mlp_tp`)."""
    name = gf.op_name(n)
    form = gf.platform_form(n, op_forms.TokenWise)
    if form is None or not form.quantizes:
        return f"{name} ({n.name}) is not a known quantisation"
    x = op_forms.arg(n, form.args[0]) if form.args else None
    xv = gf.val(x)
    if not (isinstance(x, fx.Node) and x in a.inside and isinstance(xv, torch.Tensor) and xv.dim() == 2):
        return f"{n.name} ({name}) does not quantise a [tokens, features] activation of the MLP"
    f = xv.shape[-1]
    if not (isinstance(f, int) and f % a.M == 0):
        return f"{n.name} quantises {f} features, not whole gate/up halves of {a.M}"
    for arg in n.target._schema.arguments:
        v = op_forms.arg(n, arg.name)
        if arg.name in form.args:
            if isinstance(v, fx.Node) and v not in a.inside:
                return f"{n.name} ({name}) quantises {v.name} from outside the MLP"
            continue
        if isinstance(v, (list, tuple)) and any(isinstance(e, fx.Node) for e in v):
            return f"{n.name} ({name}) has its argument {arg.name!r} set to a list of tensors"
        if not isinstance(v, fx.Node):
            continue  # None, a dtype, a number: the same on every slice
        if arg.name not in form.channel_args:
            return (f"{n.name} ({name}) has its argument {arg.name!r} set; only the per-feature vectors "
                    f"{list(form.channel_args)} can be re-sliced")
        cv = gf.val(v)
        if v in a.inside or not isinstance(cv, torch.Tensor):
            return f"{n.name} ({name}): {arg.name!r} is not a parameter vector"
        if cv.numel() == 1:
            continue  # broadcast over the features: the same on every slice
        if cv.dim() != 1 or cv.shape[0] != f:
            return f"{n.name} ({name}): {arg.name!r} has shape {list(cv.shape)}, not [{f}] (one per feature)"
        a.channel_slices.append((n, arg.name, v))
    return None


def pointwise(a: Analysis, n: fx.Node) -> str | None:
    """Elementwise ops: fine unless they mix in a non-scalar tensor from outside the MLP."""
    for x in n.all_input_nodes:
        if x in a.inside:
            continue
        v = gf.val(x)
        if isinstance(v, torch.Tensor) and v.numel() != 1:
            return f"{n.name} ({gf.op_name(n)}) mixes in tensor {x.name} from outside the MLP"
    return None


def handler_for(n: fx.Node) -> Handler | None:
    name = gf.op_name(n)
    if gf.is_getitem(n):
        return _nothing
    h = HANDLERS.get(name)
    if h is not None:
        return h
    if is_quantize(n) and gf.platform_form(n, op_forms.TokenWise) is not None:
        return quantize
    if gf.is_auto_functionalized(n) or name.startswith(("_C::", "vllm")):
        return activation
    return pointwise if is_pointwise(n) else None


def analyse(a: Analysis) -> str | None:
    """Fill a.edits, or return the reason the activation cannot be re-sliced."""
    region = a.region
    gu, dn, nodes = region.gu, region.dn, region.nodes
    if region.dn_in is not gu and region.dn_in not in nodes:
        return "down_proj's input does not depend on gate_up_proj's output"
    for n in a.inside:
        for u in n.users:
            if u not in nodes and u is not dn:
                return f"{n.name} between gate_up_proj and down_proj is also used by {u.name}"
    order = {n: i for i, n in enumerate(gu.graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__):
        h = handler_for(n)
        if h is None:
            return f"op {gf.op_name(n)} ({n.name}) between gate_up_proj and down_proj cannot be re-sliced"
        why = h(a, n)
        if why:
            return why
    return None
