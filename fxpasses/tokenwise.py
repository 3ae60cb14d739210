"""The token-wise rule table: may this op run on a Shard0 (token-sharded) value unchanged?

An op is token-wise when row i of its output depends only on row i of its token-dim inputs.
`token_aligned_args(node, is_token)` returns the inputs whose dim 0 is the token dim (they must
all be Shard0 for the op to run sharded), or None when the op is not token-wise (unknown ops
included) -- the rewriter then gives it Replicate inputs. Rules:
  * aten ops tagged `torch.Tag.pointwise` (broadcasting respected: an input is token-aligned when
    it has the output's rank and a token-sized dim 0), plus copies/casts;
  * views/reshapes/expands that keep dim 0; permute/transpose/unsqueeze/squeeze/select/slice/
    split/cat on other dims; reductions over non-token dims;
  * matmul against a non-token (replicated) weight; embedding lookups of token ids;
  * vLLM's norms and activations (`vllm_ir.*`, `_C.*`), also inside auto_functionalized[_v2].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from fxpasses import graph_forms as gf

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
                             "static_scaled_fp8_quant", "dynamic_per_token_scaled_fp8_quant")
CUSTOM_NAMESPACES = ("vllm_ir", "_C", "vllm")


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


def _tensor_args(node: fx.Node, ndim) -> list[fx.Node]:
    args = node.args[1:] if gf.is_auto_functionalized(node) else node.args
    flat, _ = tree_flatten((args, node.kwargs))
    return [a for a in flat if isinstance(a, fx.Node) and ndim(a) is not None]


def _dim_arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def token_aligned_args(node: fx.Node, is_token: Callable[[fx.Node], bool],
                       ndim: Callable[[fx.Node], int | None] = _val_ndim) -> list[fx.Node] | None:
    """Inputs whose dim 0 is the token dim if `node` is token-wise; None if it is not.

    `is_token(n)`: n's dim 0 is the token dim; `ndim(n)`: n's rank (None for non-tensors). Both
    come from the rewriter, which knows them for the nodes it created (no fake value yet)."""
    _ndim = ndim
    if node.op != "call_function":
        return None
    if gf.is_getitem(node):
        return [node.args[0]]
    name = gf.op_name(node)
    target = node.args[0] if gf.is_auto_functionalized(node) else node.target
    ns, _, short = name.partition("::")
    if ns in CUSTOM_NAMESPACES and short.endswith(CUSTOM_TOKENWISE_SUFFIXES):
        return [a for a in _tensor_args(node, ndim) if is_token(a)]
    out = _out_val(node)
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return None
    x = node.args[0] if node.args else None
    if isinstance(target, torch._ops.OpOverload) and (torch.Tag.pointwise in target.tags or name in COPY_LIKE):
        aligned = []
        for a in _tensor_args(node, ndim):
            if _ndim(a) == out.dim() and is_token(a):
                aligned.append(a)
            elif is_token(a):  # token dim broadcast into another position
                return None
        return aligned
    if name in VIEW_LIKE:
        # a row-major view keeps rows iff dim 0 is the token count before and after
        return [x] if is_token(x) and is_token(node) else None
    if name == "aten::permute":
        return [x] if _norm_dim(node.args[1][0], out.dim()) == 0 else None
    if name == "aten::transpose":
        nd = _ndim(x)
        return [x] if 0 not in (_norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)) else None
    if name == "aten::cat":
        tensors = node.args[0]
        dim = _norm_dim(_dim_arg(node, 1, "dim", 0), out.dim())
        return [t for t in tensors if is_token(t)] if dim != 0 else None
    if name in DIM_OPS:
        nd = _ndim(x)
        if name == "aten::unsqueeze":
            nd = out.dim()
        dim = _dim_arg(node, 2 if name in ("aten::split", "aten::split_with_sizes", "aten::chunk",
                                           "aten::repeat_interleave") else 1, "dim", 0)
        if name == "aten::squeeze" and dim is None:
            return None
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if any(d is None or _norm_dim(d, nd) == 0 for d in dims):
            return None
        aligned = [x]
        if name == "aten::index_select":
            return aligned
        return aligned
    if name in REDUCTIONS:
        nd = _ndim(x)
        dim = _dim_arg(node, 1, "dim")
        if dim is None:
            return None
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if not dims or any(_norm_dim(d, nd) == 0 for d in dims):
            return None
        return [x]
    if name in ("aten::mm", "aten::matmul"):
        return [x] if not is_token(node.args[1]) and _ndim(x) == 2 else None
    if name == "aten::addmm":
        bias, a, w = node.args[:3]
        if is_token(w):
            return None
        return [a] + ([bias] if _ndim(bias) == 2 and is_token(bias) else [])
    if name == "aten::linear":
        w = node.args[1]
        return None if is_token(w) else [x]
    if name == "aten::embedding":
        return [node.args[1]]
    if name.endswith("onednn_mm") and gf.is_auto_functionalized(node):
        return [a for a in _tensor_args(node, ndim) if is_token(a)]
    return None


def shape_arg_fix(node: fx.Node) -> None:
    """After `node` becomes token-sharded, make explicit shape arguments follow (dim 0 -> -1)."""
    name = gf.op_name(node)
    if name in VIEW_LIKE and isinstance(node.args[1], (list, tuple)):
        shape = list(node.args[1])
        shape[0] = -1
        node.args = (node.args[0], shape, *node.args[2:])
