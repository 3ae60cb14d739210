"""The token-wise rule table: may this op run on a Shard0 (token-sharded) value unchanged?

An op is token-wise when row i of its output depends only on row i of its token-dim inputs.
A value's token dimension is the first dim of size T with only size-1 dims before it
(`token_dim_of`): dim 0 of vLLM's native [T, H] graphs, dim 1 of its Transformers backend's
[1, T, H] graphs (the same rows in memory). `token_aligned_args(node, is_token, ndim, tdim)`
returns the inputs holding the token dim (they must all be Shard0 for the op to run sharded), or
None when the op is not token-wise (unknown ops included) -- the rewriter then gives it Replicate
inputs. Rules that name a dimension compare it with the token dim of the value they read. `RULES` maps an op name to its rule (in
the spirit of DTensor's per-op sharding strategies); vLLM's custom norms/activations and aten ops
tagged pointwise are the two fallbacks. A rule takes an `OpFacts` and returns the aligned inputs
or None, so each can be tested alone. Rules:
  * aten ops tagged `torch.Tag.pointwise` (broadcasting respected: an input is token-aligned when
    it has the output's rank and a token-sized dim 0), plus copies/casts;
  * views/reshapes/expands that keep dim 0; permute/transpose/unsqueeze/squeeze/select/slice/
    split/cat on other dims; reductions over non-token dims;
  * matmul against a non-token (replicated) weight; embedding lookups of token ids;
  * vLLM's norms and activations (`vllm_ir.*`, `_C.*`), also inside auto_functionalized[_v2];
  * platforms' custom ops (`fxpasses.op_forms`: token-wise ops with their aligned arguments,
    matmuls against a non-token weight, collectives that are the identity), decided before the
    rest of the table by `platform_rule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fxpasses import graph_forms as gf
from fxpasses import op_forms

COPY_LIKE = {"aten::clone", "aten::_to_copy", "prims::convert_element_type", "aten::alias", "aten::detach",
             "aten::contiguous", "aten::lift_fresh_copy", "aten::masked_fill", "aten::where", "aten::fill"}
VIEW_LIKE = {"aten::view", "aten::reshape", "aten::_unsafe_view", "aten::expand"}
REDUCTIONS = {"aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::var", "aten::var_mean",
              "aten::any", "aten::all", "aten::argmax", "aten::argmin", "aten::max", "aten::min",
              "aten::prod", "aten::logsumexp", "aten::_softmax", "aten::_log_softmax", "aten::softmax",
              "aten::log_softmax", "aten::std", "aten::norm", "aten::linalg_vector_norm", "aten::cumsum"}
DIM_OPS = {"aten::select", "aten::slice", "aten::split", "aten::split_with_sizes", "aten::chunk",
           "aten::unbind", "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::index_select",
           "aten::flip", "aten::roll", "aten::repeat_interleave"}
# vLLM norms / activations / rotary: every tensor argument with a token-sized dim 0 is token-aligned
CUSTOM_TOKENWISE_SUFFIXES = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_and_mul",
                             "gelu_tanh_and_mul", "mul_and_silu", "fatrelu_and_mul", "swigluoai_and_mul",
                             "gelu_new", "gelu_fast", "gelu_quick", "layer_norm", "rotary_embedding",
                             "static_scaled_fp8_quant", "dynamic_per_token_scaled_fp8_quant",
                             "static_scaled_int8_quant", "dynamic_scaled_int8_quant")
# activation quantisation for a quantised matmul (vLLM's `_C` ops; platforms' by `quantizes`)
QUANTIZE_SUFFIXES = ("scaled_fp8_quant", "scaled_int8_quant")
CUSTOM_NAMESPACES = ("vllm_ir", "_C", "vllm")


def token_dim_of(v, T) -> int | None:
    """The token dimension of tensor value `v` for token count `T`: the first dim of size T when
    every dim before it has size 1 ([T, H] -> 0, [1, T, H] -> 1, [1, 2, T, d] -> None); None for a
    non-tensor or a tensor without one. A list or tuple of tensors answers for its first tensor."""
    if isinstance(v, (list, tuple)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    if not isinstance(v, torch.Tensor):
        return None
    for i, s in enumerate(v.shape):
        if gf.same_size(s, T):
            return i
        if not (isinstance(s, int) and s == 1):
            return None
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _val_ndim(n) -> int | None:
    v = gf.val(n)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _out_val(node: fx.Node):
    v = gf.val(node)
    if isinstance(v, (list, tuple)):
        v = next((x for x in v if isinstance(x, torch.Tensor)), None)
    return v


def _dim_arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


@dataclass
class OpFacts:
    """What a rule may ask about one node: its name, output, first argument, and the rewriter's
    view of any value (`is_token`: it has a token dim; `ndim`: rank, None for non-tensors; `tdim`:
    its token dim, None without one -- also asked of `node` itself, for its output)."""

    node: fx.Node
    name: str
    is_token: Callable[[fx.Node], bool]
    ndim: Callable[[fx.Node], "int | None"]
    tdim: Callable[[fx.Node], "int | None"]

    def td(self, n) -> int:
        """`n`'s token dim, 0 when it has none (rules that read a non-token operand keep dim 0)."""
        d = self.tdim(n) if isinstance(n, fx.Node) else None
        return 0 if d is None else d

    @property
    def out(self):
        return _out_val(self.node)

    @property
    def x(self):
        return self.node.args[0] if self.node.args else None

    def tensor_args(self) -> list[fx.Node]:
        n = self.node
        args = n.args[1:] if gf.is_auto_functionalized(n) else n.args
        flat, _ = tree_flatten((args, n.kwargs))
        return [a for a in flat if isinstance(a, fx.Node) and self.ndim(a) is not None]

    def token_tensor_args(self) -> list[fx.Node]:
        return [a for a in self.tensor_args() if self.is_token(a)]


def registrar(table: dict):
    """A decorator factory filling an op table: `@register("aten::view", ...)` maps each op name to
    the decorated function (the token-wise rules here, MLP-TP's activation handlers)."""
    def register(*names: str):
        def deco(fn):
            for n in names:
                table[n] = fn
            return fn
        return deco
    return register


Rule = Callable[[OpFacts], "list[fx.Node] | None"]
RULES: dict[str, Rule] = {}
rule = registrar(RULES)  # register a rule for the given op names ("aten::view", ...)


def custom_tokenwise(f: OpFacts):
    """vLLM norms / activations / rotary: every tensor argument with a token-sized dim 0."""
    return f.token_tensor_args()


def pointwise(f: OpFacts):
    """Broadcasting respected: an input is token-aligned when it has the output's rank and its token
    dim where the output has it; a token dim broadcast into another position is not token-wise."""
    out_dim, out_td = f.out.dim(), f.tdim(f.node)
    aligned = []
    for a in f.tensor_args():
        if not f.is_token(a):
            continue
        if out_td is None or f.ndim(a) != out_dim or f.tdim(a) != out_td:
            return None
        aligned.append(a)
    return aligned


rule(*COPY_LIKE)(pointwise)


@rule(*VIEW_LIKE)
def view(f: OpFacts):
    """A row-major view keeps rows iff input and output both have a token dim (only size-1 dims
    before it, so row t is the t-th block of the same memory in both)."""
    return [f.x] if f.is_token(f.x) and f.is_token(f.node) else None


def _moved_token(f: OpFacts, source_dim_of) -> list[fx.Node] | None:
    """[x] when the output's token dim is where `source_dim_of(out_dim)` says x's token dim went."""
    tin, tout = f.tdim(f.x), f.tdim(f.node)
    if tin is None or tout is None:
        return None
    return [f.x] if source_dim_of(tout) == tin else None


@rule("aten::permute")
def permute(f: OpFacts):
    perm = [_norm_dim(d, f.out.dim()) for d in f.node.args[1]]
    return _moved_token(f, lambda d: perm[d])


@rule("aten::transpose")
def transpose(f: OpFacts):
    nd = f.ndim(f.x)
    d0, d1 = _norm_dim(f.node.args[1], nd), _norm_dim(f.node.args[2], nd)
    return _moved_token(f, lambda d: d1 if d == d0 else d0 if d == d1 else d)


@rule("aten::cat")
def cat(f: OpFacts):
    dim = _norm_dim(_dim_arg(f.node, 1, "dim", 0), f.out.dim())
    tout = f.tdim(f.node)
    aligned = [t for t in f.node.args[0] if f.is_token(t)]
    if tout is None or dim == tout or any(f.tdim(t) != tout for t in aligned):
        return None
    return aligned


@rule(*DIM_OPS)
def along_other_dim(f: OpFacts):
    """select/slice/split/... on a dim other than the token dim; unsqueeze anywhere (a size-1 dim
    inserted before the token dim moves it one on). The output must keep a token dim."""
    nd = f.out.dim() if f.name == "aten::unsqueeze" else f.ndim(f.x)
    dim = _dim_arg(f.node, 2 if f.name in ("aten::split", "aten::split_with_sizes", "aten::chunk",
                                           "aten::repeat_interleave") else 1, "dim", 0)
    if f.name == "aten::squeeze" and dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    tin = f.td(f.x)
    if any(d is None for d in dims) or f.tdim(f.node) is None:
        return None
    if f.name == "aten::unsqueeze":
        d = _norm_dim(dims[0], nd)
        return [f.x] if f.tdim(f.node) == tin + (1 if d <= tin else 0) else None
    if any(_norm_dim(d, nd) == tin for d in dims):
        return None
    return [f.x]


@rule("aten::topk", "aten::sort")
def along_last_dim(f: OpFacts):
    """topk / sort along a dim other than the token dim (the router's top-k over experts)."""
    nd = f.ndim(f.x)
    default = -1
    dim = _dim_arg(f.node, 2 if f.name == "aten::topk" else 1, "dim", default)
    if f.name == "aten::sort" and isinstance(dim, bool):  # sort(x, stable, dim=...) overload
        dim = f.node.kwargs.get("dim", -1)
    if nd is None or not f.is_token(f.x) or _norm_dim(dim, nd) == f.td(f.x):
        return None
    return [f.x]


@rule(*REDUCTIONS)
def reduction(f: OpFacts):
    """Reductions over non-token dims (the output keeps a token dim)."""
    nd = f.ndim(f.x)
    dim = _dim_arg(f.node, 1, "dim")
    if dim is None:
        return None
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if not dims or any(_norm_dim(d, nd) == f.td(f.x) for d in dims) or f.tdim(f.node) is None:
        return None
    return [f.x]


@rule("aten::mm", "aten::matmul")
def mm(f: OpFacts):
    """Matmul against a non-token (replicated) weight, tokens on dim 0 of a 2-D input."""
    return [f.x] if not f.is_token(f.node.args[1]) and f.ndim(f.x) == 2 and f.td(f.x) == 0 else None


@rule("aten::addmm")
def addmm(f: OpFacts):
    bias, a, w = f.node.args[:3]
    if f.is_token(w) or f.td(a) != 0:
        return None
    return [a] + ([bias] if f.ndim(bias) == 2 and f.is_token(bias) else [])


@rule("aten::linear")
def linear(f: OpFacts):
    """Contracts the last dim: token-wise unless that is the token dim or the weight is token-sized."""
    nd = f.ndim(f.x)
    if f.is_token(f.node.args[1]) or nd is None or f.td(f.x) >= nd - 1:
        return None
    return [f.x]


@rule("aten::embedding")
def embedding(f: OpFacts):
    """Embedding lookups of token ids."""
    return [f.node.args[1]]


def platform_rule(f: OpFacts, form: op_forms.OpForm):
    """A platform op's rule from its `fxpasses.op_forms` record."""
    node = f.node
    if isinstance(form, op_forms.TokenWise):
        if form.dim_arg:
            d = op_forms.arg(node, form.dim_arg)
            d = form.dim_default if d is None else d
            first = op_forms.arg(node, form.args[0]) if form.args else None
            nd = f.ndim(first) if isinstance(first, fx.Node) else None
            if not isinstance(d, int) or nd is None or _norm_dim(d, nd) == f.td(first):
                return None
        present = [a for a in (op_forms.arg(node, n) for n in form.args) if isinstance(a, fx.Node)]
        aligned = [a for a in present if f.is_token(a)]
        if form.all_args and len(aligned) != len(present):
            return None
        return aligned
    if isinstance(form, op_forms.Matmul):
        x, w = op_forms.arg(node, form.x), op_forms.arg(node, form.weight)
        if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or f.is_token(w):
            return None
        extra = [a for a in (op_forms.arg(node, n) for n in form.token_args + ((form.out,) if form.out else ()))
                 if isinstance(a, fx.Node)]
        return [x] + [a for a in extra if f.is_token(a)]
    if isinstance(form, op_forms.Collective):  # token-wise only when it moves nothing (the identity)
        x = op_forms.arg(node, form.input)
        return [x] if gf.collective_kind(node) is None and isinstance(x, fx.Node) else None
    return None


def is_quantize(node: fx.Node) -> bool:
    """`node` quantises a linear layer's input (vLLM's `_C` int8/fp8 activation quantisation, also
    inside auto_functionalized, or a platform op whose record says `quantizes`)."""
    if node.op != "call_function":
        return False
    form = gf.platform_form(node, op_forms.TokenWise)
    if form is not None:
        return form.quantizes
    ns, _, short = gf.op_name(node).partition("::")
    return ns in CUSTOM_NAMESPACES and short.endswith(QUANTIZE_SUFFIXES)


def _is_custom_tokenwise(name: str) -> bool:
    ns, _, short = name.partition("::")
    return ns in CUSTOM_NAMESPACES and short.endswith(CUSTOM_TOKENWISE_SUFFIXES)


def _is_pointwise(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags


def is_pointwise(node: fx.Node) -> bool:
    """An elementwise node: an aten op tagged pointwise, or a copy/cast."""
    return _is_pointwise(node.target) or gf.op_name(node) in COPY_LIKE


def rule_for(node: fx.Node) -> Rule | None:
    """The rule that decides `node`, or None (not token-wise). Call only on call_function nodes
    with a tensor output (`token_aligned_args` checks)."""
    name = gf.op_name(node)
    form = gf.platform_form(node)
    if form is not None:
        return lambda f: platform_rule(f, form)
    if _is_custom_tokenwise(name):
        return custom_tokenwise
    r = RULES.get(name)
    if r is not None:
        return r
    target = node.args[0] if gf.is_auto_functionalized(node) else node.target
    return pointwise if _is_pointwise(target) else None


def token_aligned_args(node: fx.Node, is_token: Callable[[fx.Node], bool],
                       ndim: Callable[[fx.Node], int | None] = _val_ndim,
                       tdim: Callable[[fx.Node], int | None] | None = None) -> list[fx.Node] | None:
    """Inputs that hold the token dim if `node` is token-wise; None if it is not.

    `is_token(n)`: n has a token dim; `ndim(n)`: n's rank (None for non-tensors); `tdim(n)`: n's
    token dim (default: 0 wherever `is_token` holds). They come from the rewriter, which knows them
    for the nodes it created (no fake value yet)."""
    if node.op != "call_function":
        return None
    if gf.is_getitem(node):
        return [node.args[0]]
    if tdim is None:  # dim 0 only (the output is assumed to keep its rows there)
        def tdim(n):
            return 0 if n is node or is_token(n) else None
    f = OpFacts(node, gf.op_name(node), is_token, ndim, tdim)
    form = gf.platform_form(node)
    if form is not None:
        return platform_rule(f, form)
    if _is_custom_tokenwise(f.name):
        return custom_tokenwise(f)
    out = f.out
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return None
    r = rule_for(node)
    return r(f) if r is not None else None


def shape_arg_fix(node: fx.Node, shard_rows: Callable[[], object], token_dim: int = 0) -> None:
    """After `node` becomes token-sharded, make explicit shape arguments follow: the output's token
    dim `token_dim` becomes -1, or the shard's row count (`shard_rows()`: an int or a graph value)
    when another dim is already inferred (-1). (In an expand, -1 keeps the input's size: fine.)"""
    name = gf.op_name(node)
    if name in VIEW_LIKE and isinstance(node.args[1], (list, tuple)):
        shape = list(node.args[1])
        others = shape[:token_dim] + shape[token_dim + 1:]
        shape[token_dim] = shard_rows() if any(isinstance(d, int) and d == -1 for d in others) else -1
        node.args = (node.args[0], shape, *node.args[2:])
