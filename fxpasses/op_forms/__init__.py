"""Platform op forms as data: what a platform's custom ops mean to fxpasses.

This package owns the table of custom ops that platforms put into traced graphs (vllm-ascend's
`npu::npu_rms_norm`, `vllm::unquantized_gemm`, ...) and the few questions fxpasses asks of them.
Each platform is one data module here (`npu.py`) defining `FORMS`, a tuple of records:

    TokenWise(op, args, ...)      row i of every output depends only on row i of `args` (their
                                  dim 0 is the token dim); every output is token-major
    Matmul(op, x, weight, ...)    a linear layer's product: activation, weight and bias arguments,
                                  token-aligned extras (a per-token dequant scale), the weight's
                                  layout and whether the platform may keep it in a private format
    Collective(op, input, ...)    a collective whose kind the traced shapes decide (an op whose
                                  behaviour flips on a runtime switch records the result of the
                                  switch in its fake output: same rows or not)

Arguments are named as in the op's schema (`torch.ops.<ns>.<op>.default._schema`); a record whose
names do not fit the traced op's schema is not applied (the op stays unknown: not token-wise,
not a matmul, not a collective), so a schema change degrades to "left alone", never to a wrong
rewrite. The interpreting code is small and generic: `fxpasses.graph_forms` (matmuls,
collectives, all-reduces), `fxpasses.tokenwise` (the token-wise table), `fxpasses.sites` (matmul
operands), `fxpasses.comm_volume` (bytes). Adding a platform is a new module here defining
`FORMS` (found automatically), or `register(*forms)` from user code.

This module imports nothing of fxpasses (graph_forms imports it).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx


@dataclass(frozen=True)
class OpForm:
    op: str                              # "namespace::name", any overload
    note: str = ""                       # what the op is, where it comes from (documentation)

    def arg_names(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class TokenWise(OpForm):
    """Token-wise: row i of each output depends on row i of `args` only (norms, activations,
    rotary embedding, per-token quantisation). Arguments not listed (weights, scales, caches) are
    never token-aligned; a listed argument that is None or not token-sized is simply not aligned,
    unless `all_args` demands every present listed argument be token-sized (rotary: positions,
    query and key together, never a [3, T] M-RoPE position tensor). `dim_arg` (with its default
    `dim_default`) names a dim argument the op works along: the op is not token-wise along dim 0.
    `quantizes`: the op quantises a linear layer's input (its outputs are the int8 values and, for
    a dynamic scheme, their per-token scales); `int8_comm` decides which side of a collective it
    runs on (`fxpasses.rewriter`). `channel_args`: arguments that are per-feature vectors over the
    last dim of `args` (a quantisation's scale, reciprocal, offset, smoothing scales; a
    broadcast [1] too): MLP-TP slices them with the features (`fxpasses.strategies.mlp_activation`)."""

    args: tuple[str, ...] = ()
    all_args: bool = False
    dim_arg: str | None = None
    dim_default: int = -1
    quantizes: bool = False
    channel_args: tuple[str, ...] = ()

    def arg_names(self):
        return self.args + ((self.dim_arg,) if self.dim_arg else ()) + self.channel_args


@dataclass(frozen=True)
class Matmul(OpForm):
    """A linear layer's matmul. `weight_layout`: "out_in" ([out, in], as F.linear reads it) or
    "in_out" ([in, out], e.g. a quantised weight stored transposed). `token_args`: extra
    arguments aligned with the activation's rows (a per-token dequant scale). `quantized`: the
    activation is quantised and the result dequantised by the op. `private_format`: the name of a
    device-private layout the platform may store this weight in (Ascend's FRACTAL_NZ), in which
    case the weight is never sliced or gathered in the graph unless the configuration declares
    plain weights (`weight_format`, see `weight_block_refusal`); `never_private`: dtypes the
    platform never stores in it. `channel_args`: per-output-channel arguments of a quantised
    matmul (its dequant scale [out]); `offset`: an argument that must be None for FlashComm2's
    quantised rewrite (an asymmetric output offset)."""

    x: str = "x"
    weight: str = "weight"
    bias: str | None = None
    token_args: tuple[str, ...] = ()
    weight_layout: str = "out_in"
    quantized: bool = False
    private_format: str | None = None
    never_private: tuple[str, ...] = ()
    channel_args: tuple[str, ...] = ()
    offset: str | None = None
    packed: bool = False
    out: str | None = None
    fused_quant: str = ""

    def arg_names(self):
        return ((self.x, self.weight) + ((self.bias,) if self.bias else ()) + self.token_args
                + self.channel_args + ((self.offset,) if self.offset else ()) + ((self.out,) if self.out else ()))

    def operands(self, node: fx.Node):
        """(activation, weight, bias) nodes (bias None when absent; weight None when `packed`)."""
        b = arg(node, self.bias) if self.bias else None
        w = None if self.packed else arg(node, self.weight)
        return arg(node, self.x), w, b if isinstance(b, fx.Node) else None


@dataclass(frozen=True)
class Collective(OpForm):
    """A collective over dim 0 whose kind follows from the traced shapes: `same_rows` when its
    output has as many rows as its input, `other_rows` otherwise (None = no communication: the
    op is the identity and token-wise). Kinds: all_reduce, reduce_scatter, all_gather,
    all_to_all. `group_arg` names a str argument holding the group's name; without one the op
    runs on an implicit group labelled `implicit_group`. `world_size_arg` names an int argument
    giving the group size, if any. `comm`: the collective family the graph uses ("vllm": vLLM's
    custom ops), which the comm backend mirrors when it emits collectives next to it."""

    input: str = "x"
    same_rows: str | None = None
    other_rows: str | None = None
    group_arg: str | None = None
    implicit_group: str = "tp"
    world_size_arg: str | None = None
    comm: str = "vllm"

    def arg_names(self):
        return tuple(a for a in (self.input, self.group_arg, self.world_size_arg) if a)


# ---- the registry -------------------------------------------------------------------------------

_FORMS: dict[str, OpForm] = {}
_PLATFORMS: dict[str, str] = {}     # op -> the platform module that declared it
_discovered = False
_FIT_CACHE: dict[tuple[str, Any], bool] = {}  # (op, traced OpOverload) -> the record fits its schema


def register(*forms: OpForm, platform: str = "user") -> None:
    """Add (or replace) op forms."""
    for f in forms:
        if not isinstance(f, OpForm) or "::" not in f.op:
            raise ValueError(f"an op form needs an 'namespace::name' op, got {f!r}")
        _FORMS[f.op] = f
        _PLATFORMS[f.op] = platform
    _FIT_CACHE.clear()


def _discover() -> None:
    """Import the platform modules of this package once; each declares `FORMS`."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        forms = getattr(mod, "FORMS", None)
        if forms:
            register(*forms, platform=getattr(mod, "PLATFORM", info.name))


def forms() -> dict[str, OpForm]:
    """Every registered op form by op name."""
    _discover()
    return dict(_FORMS)


def platform_of(op: str) -> str | None:
    _discover()
    return _PLATFORMS.get(op)


def _fits(form: OpForm, target) -> bool:
    """Every argument the record names exists in the traced op's schema (memoised per schema)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    key = (form.op, target)
    hit = _FIT_CACHE.get(key)
    if hit is None:
        names = {a.name for a in schema.arguments}
        hit = _FIT_CACHE[key] = all(n in names for n in form.arg_names())
    return hit


_AUTO_FUNCTIONALIZED = ("auto_functionalized", "auto_functionalized_v2")


def wrapped_op(node: fx.Node):
    """The OpOverload a call runs: its target, or for auto_functionalized[_v2] (how a mutating
    custom op is traced) the op it wraps; None for anything else."""
    t = node.target
    if getattr(t, "__name__", "") in _AUTO_FUNCTIONALIZED and node.args:
        t = node.args[0]
    return t if isinstance(t, torch._ops.OpOverload) else None


def find(name: str, node: fx.Node, kind: type | None = None) -> OpForm | None:
    """The form registered for op `name` (as `graph_forms.op_name` spells it) if it is of `kind`
    and fits `node`'s schema; None otherwise."""
    if not _discovered:
        _discover()
    f = _FORMS.get(name)
    if f is None or (kind is not None and not isinstance(f, kind)):
        return None
    op = wrapped_op(node)
    return f if op is not None and _fits(f, op) else None


def _functionalized_arg(node: fx.Node, name: str) -> Any:
    """Argument `name` of the op wrapped by an auto_functionalized[_v2] node: a keyword of the node,
    or (v2, a mutated argument) the base tensor `_all_bases[_<name>_base_index]`."""
    if name in node.kwargs:
        return node.kwargs[name]
    idx = node.kwargs.get(f"_{name}_base_index")
    if idx is not None:
        return node.kwargs["_all_bases"][idx]
    schema = node.args[0]._schema
    a = next((a for a in schema.arguments if a.name == name), None)
    if a is None:
        raise KeyError(f"{schema.name} has no argument {name!r}")
    return a.default_value if a.has_default_value() else None


#: c10 ScalarType codes (c10/core/ScalarType.h, ABI-stable) of the dtypes platform ops are called with:
#: newer op-plugin kernels type their dtype arguments `int?`, so a traced graph may hold the code
SCALAR_TYPE_CODES = {1: torch.int8, 3: torch.int32, 5: torch.float16, 6: torch.float32, 7: torch.float64,
                     15: torch.bfloat16}


def as_dtype(v: Any) -> Any:
    """A dtype argument as a torch.dtype: a ScalarType code decoded, a dtype or None as it is;
    an unknown code stays an int."""
    if isinstance(v, int) and not isinstance(v, bool):
        return SCALAR_TYPE_CODES.get(v, v)
    return v


def arg(node: fx.Node, name: str) -> Any:
    """The value of schema argument `name` at `node` (positional or keyword; its default when the
    call left it out); for an auto_functionalized[_v2] node, of the op it wraps."""
    if node.target is not wrapped_op(node):
        return _functionalized_arg(node, name)
    schema = node.target._schema
    for i, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if not a.kwarg_only and i < len(node.args):
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        return a.default_value if a.has_default_value() else None
    raise KeyError(f"{schema.name} has no argument {name!r}")


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set schema argument `name` of `node` (positional where the call passed it so, else keyword)."""
    _plain_call(node)
    for i, a in enumerate(node.target._schema.arguments):
        if a.name != name:
            continue
        if not a.kwarg_only and i < len(node.args):
            args = list(node.args)
            args[i] = value
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: value}
        return
    raise KeyError(f"{node.target._schema.name} has no argument {name!r}")


def call_like(node: fx.Node, graph: fx.Graph, **overrides: Any) -> fx.Node:
    """A new call of `node`'s op with `node`'s arguments, `overrides` replacing some by schema name
    (inserted at the graph's insertion point)."""
    _plain_call(node)
    args, kwargs = [], {}
    for a in node.target._schema.arguments:
        v = overrides[a.name] if a.name in overrides else arg(node, a.name)
        if a.kwarg_only:
            kwargs[a.name] = v
        else:
            args.append(v)
    return graph.call_function(node.target, tuple(args), kwargs)


def _plain_call(node: fx.Node) -> None:
    if node.target is not wrapped_op(node):
        raise TypeError(f"{node.name}: an auto_functionalized call is rewritten by its wrapped op's buffers, "
                        "not argument by argument; strategies leave packed (mutating) matmuls alone")


# ---- policy over the data -----------------------------------------------------------------------

#: the `weight_format` configuration values (see `fxpasses.config.FxPassesConfig`)
WEIGHT_FORMATS = ("unknown", "nd", "nd_float", "nz")


def weight_block_refusal(form: Matmul, weight: fx.Node | None, weight_format: str) -> str | None:
    """Why the weight of a platform matmul may not be sliced or gathered in the graph, or None.

    `weight_format`: "nd" every weight is plain row-major; "nd_float" floating-point weights are,
    quantised (integer) ones may not be; "nz" / "unknown" any weight may be in the private format.
    Dtypes the platform never converts (`never_private`) are plain whatever the setting."""
    if form.private_format is None:
        return None
    v = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    dtype = v.dtype if isinstance(v, torch.Tensor) else None
    dname = str(dtype).removeprefix("torch.") if dtype is not None else "unknown dtype"
    if dtype is not None and dname in form.never_private:
        return None
    if weight_format == "nd":
        return None
    if weight_format == "nd_float" and dtype is not None and dtype.is_floating_point:
        return None
    return (f"the weight of {form.op} ({dname}) may be stored in the device-private {form.private_format} "
            f"format (weight_format={weight_format!r}), so it is never sliced or gathered in the graph; "
            "declare plain ND weights with weight_format='nd' (vllm-ascend: additional_config "
            "weight_nz_mode=0 or VLLM_ASCEND_ENABLE_NZ=0; 'nd_float' for mode 1 covers float weights) "
            "to allow it")


__all__ = ["OpForm", "TokenWise", "Matmul", "Collective", "register", "forms", "find", "arg", "wrapped_op",
           "platform_of", "weight_block_refusal", "WEIGHT_FORMATS"]
