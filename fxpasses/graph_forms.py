"""Recognisers for the op forms vLLM's post-grad graphs contain (measured on vLLM 0.32 / torch 2.13).

Everything that asks "what kind of node is this?" lives here: matmuls (aten mm/addmm/linear/bmm;
vLLM CPU's `_C.onednn_mm`, `_C.weight_packed_linear`, ... are data in `fxpasses.op_forms.vllm_cpu`,
also inside `auto_functionalized[_v2]`), TP all-reduces (`vllm.all_reduce`,
`_c10d_functional.all_reduce[_]` + `wait_tensor`, `_C.shm_allreduce` inside auto_functionalized),
other collectives, and the module-stack -> vLLM prefix translation. Platforms' custom ops
(vllm-ascend's `vllm.unquantized_gemm`, `npu.npu_quant_matmul`, `vllm.maybe_pad_and_reduce`, ...)
are data in `fxpasses.op_forms`, consulted here through `platform_form`.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from fxpasses import op_forms

aten = torch.ops.aten
HOP_AUTO_FUNC = ("auto_functionalized", "auto_functionalized_v2")


def op_name(node: fx.Node) -> str:
    """'aten::mm', '_c10d_functional::all_reduce_', 'vllm::all_reduce', '_C::onednn_mm', ... ;
    for auto_functionalized[_v2] the wrapped op's name."""
    if node.op != "call_function":
        return ""
    t = node.target
    if is_auto_functionalized(node):
        t = node.args[0]
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name
    return getattr(t, "__name__", str(t))


def is_auto_functionalized(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in HOP_AUTO_FUNC


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm", "aten::baddbmm",
              "aten::_weight_int8pack_mm"}  # platforms' matmuls (vLLM CPU's `_C` kernels too): op_forms
EMBEDDING_OPS = {"aten::embedding"}


def platform_form(node: fx.Node, kind: type | None = None) -> op_forms.OpForm | None:
    """The `fxpasses.op_forms` record of `node`'s op (of `kind`, e.g. `op_forms.Matmul`), or None."""
    op = op_forms.wrapped_op(node) if node.op == "call_function" else None
    if op is None:
        return None
    return op_forms.find(op._schema.name, node, kind)


def is_matmul(node: fx.Node) -> bool:
    return op_name(node) in MATMUL_OPS or platform_form(node, op_forms.Matmul) is not None


@dataclass
class AllReduce:
    """One TP all-reduce in one of its graph forms.

    `input` is the partial tensor, `result` the node whose users see the reduced value, `nodes`
    every node of the form (erased together when the form is replaced)."""

    form: str            # "vllm" | "c10d" | "shm"
    input: fx.Node
    result: fx.Node
    nodes: list[fx.Node]
    group_name: str | None  # vLLM unique name ("tp:0") for "vllm", c10d group name for "c10d"

    def runs_on(self, group) -> bool:
        """Does this all-reduce reduce over `group` (a GroupRef)? The shm form names no group: vLLM
        creates its shared-memory all-reduce on the TP/PP groups only, so it is taken as TP's; so is
        a platform form whose all-reduce is implicitly TP's (`op_forms.Collective`, no group arg)."""
        if self.form == "shm" or self.group_name is None:
            return True
        return self.group_name in (group.c10d_name, group.vllm_name)


def is_stored_value(n) -> bool:
    """A graph input or attribute: a stored weight, scale or bias (never computed in the graph)."""
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


def tag_node(node: fx.Node, **fields) -> fx.Node:
    """Record what fxpasses made of a node it inserted in `meta["fxpasses"]` (its `role`, the
    `collective` and `group` / `group_size` it communicates over, the `strategy` that made it, ...):
    the one place those tags are written; `fxpasses.comm_volume` and the reports read them."""
    node.meta.setdefault("fxpasses", {}).update(fields)
    return node


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def wait_after(node: fx.Node) -> fx.Node | None:
    """The `wait_tensor` that is a functional collective's only user, or None."""
    w = _single_user(node)
    return w if w is not None and op_name(w) == "_c10d_functional::wait_tensor" else None


def all_gather_rows(node: fx.Node) -> tuple[fx.Node, str, int | None] | None:
    """(result node, group, size) of an all_gather along dim 0 (its wait in the functional form), or
    None for any other node."""
    name = op_name(node)
    if name == "vllm::all_gather":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return (node, collective_group(node), collective_world_size(node)) if dim == 0 else None
    if name == "_c10d_functional::all_gather_into_tensor":
        w = wait_after(node)
        return (w, collective_group(node), collective_world_size(node)) if w is not None else None
    return None


def is_unpad(node: fx.Node, src: fx.Node) -> bool:
    """`node` is `src[:end]` along dim 0 (the slice that drops an all-gather's padding rows)."""
    return (op_name(node) == "aten::slice" and node.args[0] is src and len(node.args) >= 4
            and node.args[1] == 0 and node.args[2] in (0, None) and (len(node.args) < 5 or node.args[4] == 1))


def match_all_reduce(node: fx.Node) -> AllReduce | None:
    """Recognise `node` as the head of a TP all-reduce (sum) in any of the supported forms."""
    name = op_name(node)
    if name == "vllm::all_reduce":
        gname = node.kwargs.get("group_name", node.args[1] if len(node.args) > 1 else None)
        return AllReduce("vllm", node.args[0], node, [node], gname)
    if name in ("_c10d_functional::all_reduce", "_c10d_functional::all_reduce_"):
        reduce_op = node.args[1] if len(node.args) > 1 else node.kwargs.get("reduceOp")
        if str(reduce_op).lower() not in ("sum",):
            return None
        wait = _single_user(node)
        if wait is None or op_name(wait) != "_c10d_functional::wait_tensor":
            return None
        gname = node.args[2] if len(node.args) > 2 else node.kwargs.get("group_name")
        return AllReduce("c10d", node.args[0], wait, [node, wait], gname)
    if name == "_C::shm_allreduce" and is_auto_functionalized(node):
        data = node.kwargs.get("data")
        bases = node.kwargs.get("_all_bases")
        if bases is not None:  # v2: data is bases[_data_base_index]
            data = bases[node.kwargs.get("_data_base_index", 0)]
        getters = [u for u in node.users if is_getitem(u)]
        # auto_functionalized returns (op outputs..., *mutated inputs); shm_allreduce returns None
        outs = [g for g in getters if g.args[1] == len(getters) - 1 or len(getters) == 1]
        if data is None or len(outs) != 1:
            return None
        return AllReduce("shm", data, outs[0], [node, *getters], None)
    form = platform_form(node, op_forms.Collective)
    if form is not None and _platform_kind(node, form) == "all_reduce":
        gname = str(op_forms.arg(node, form.group_arg)) if form.group_arg else None
        return AllReduce(form.comm, op_forms.arg(node, form.input), node, [node], gname)
    return None


_INDEX_RE = re.compile(r"\[(\d+)\]")


@functools.lru_cache(maxsize=65536)
def module_path(stack_entry_path: str) -> str:
    """Dynamo's module path -> dotted attribute path.

    "L['self'].layers[0].self_attn.o_proj" -> "layers.0.self_attn.o_proj";
    "L['self']._modules['layers']._modules['0'].mlp" -> "layers.0.mlp";
    "L['self'].model.layers.0.mlp" -> "model.layers.0.mlp"."""
    p = stack_entry_path
    p = re.sub(r"^L\['self'\]\.?", "", p)
    p = re.sub(r"^L\['(\w+)'\]\.?", r"\1.", p)
    p = re.sub(r"_modules\['([^']+)'\]", r"\1", p)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    p = _INDEX_RE.sub(r".\1", p)
    p = re.sub(r"getattr\([^,]+,\s*'([^']+)'\)", r"\1", p)
    return re.sub(r"\.{2,}", ".", p).strip(".")


def module_stack_last(node: fx.Node) -> tuple[str, Any] | None:
    """(module path, class or class-name) of the innermost module a node was traced in."""
    st = node.meta.get("nn_module_stack")
    if not st:
        return None
    _, val = list(st.items())[-1]
    path, cls = val
    return module_path(path), cls


_DYNAMO_SEGMENTS = {"cell_contents", "G"}


def normalise_prefix(path: str) -> str:
    """The vLLM prefix a Dynamo module path stands for.

    A layer reached through vLLM's forward context (`...no_compile_layers.<prefix>`) is named by
    what follows the last `no_compile_layers`; closure cells (`__closure__.<i>.cell_contents`),
    other dunder attributes (`__import_vllm_dot_forward_context`) and the globals root `G` are
    dropped."""
    if "no_compile_layers." in path:
        path = path.rsplit("no_compile_layers.", 1)[1]
    out: list[str] = []
    skip_index = False
    for seg in path.split("."):
        if skip_index and seg.isdigit():
            skip_index = False
            continue
        skip_index = seg == "__closure__"
        if seg.startswith("__") or seg in _DYNAMO_SEGMENTS or seg == "_forward_context":
            continue
        out.append(seg)
    return ".".join(out)


def layer_prefix(module_prefix: str, path: str) -> str:
    """The vLLM layer prefix of a module path read from `nn_module_stack` in a graph compiled under
    `module_prefix` (vLLM compiles "model"); a path through vLLM's forward context is absolute."""
    absolute = "no_compile_layers." in path  # vLLM's forward context is keyed by the full prefix
    path = normalise_prefix(path)
    if absolute:
        return path
    return f"{module_prefix}.{path}" if module_prefix and path else (path or module_prefix)


def class_names(cls: Any) -> list[str]:
    """The class's name followed by its base classes' names (strings work too)."""
    if isinstance(cls, type):
        return [c.__name__ for c in cls.__mro__]
    s = str(cls)
    s = s.split("'")[1] if s.startswith("<class '") else s
    return [s.rsplit(".", 1)[-1]]


def val(node: Any):
    """The FakeTensor (or SymInt/...) recorded for a node, or None."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


COLLECTIVE_OPS = {
    "vllm::all_reduce": "all_reduce", "_c10d_functional::all_reduce": "all_reduce",
    "_c10d_functional::all_reduce_": "all_reduce", "_C::shm_allreduce": "all_reduce",
    "vllm::reduce_scatter": "reduce_scatter", "_c10d_functional::reduce_scatter_tensor": "reduce_scatter",
    "vllm::all_gather": "all_gather", "_c10d_functional::all_gather_into_tensor": "all_gather",
    "_c10d_functional::all_to_all_single": "all_to_all", "_C::shm_all_gather": "all_gather",
}


def _platform_kind(node: fx.Node, form: op_forms.Collective) -> str | None:
    """A platform collective's kind, from its traced shapes (see `op_forms.Collective`)."""
    x, out = val(op_forms.arg(node, form.input)), val(node)
    if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dim() >= 1 and out.dim() >= 1 \
            and same_size(x.shape[0], out.shape[0]):
        return form.same_rows
    return form.other_rows


def collective_kind(node: fx.Node) -> str | None:
    kind = COLLECTIVE_OPS.get(op_name(node))
    if kind is None:
        form = platform_form(node, op_forms.Collective)
        kind = _platform_kind(node, form) if form is not None else None
    return kind


def collective_input(node: fx.Node) -> fx.Node | None:
    """The tensor a collective node sends (the data of an auto_functionalized shm all-reduce)."""
    if is_auto_functionalized(node):  # shm_allreduce(data=...)
        d = node.kwargs.get("data")
        if d is None and node.kwargs.get("_all_bases") is not None:
            d = node.kwargs["_all_bases"][node.kwargs.get("_data_base_index", 0)]
        return d
    form = platform_form(node, op_forms.Collective)
    if form is not None:
        return op_forms.arg(node, form.input)
    return node.args[0] if node.args else None


def collective_world_size(node: fx.Node) -> int | None:
    """The group size a collective node states itself (None when it names none)."""
    name = op_name(node)
    if name == "_c10d_functional::reduce_scatter_tensor":
        return int(node.args[2])
    if name == "_c10d_functional::all_gather_into_tensor":
        return int(node.args[1])
    if name in ("vllm::reduce_scatter", "vllm::all_gather"):
        return int(node.kwargs.get("world_size", node.args[2]))
    form = platform_form(node, op_forms.Collective)
    if form is not None and form.world_size_arg:
        return int(op_forms.arg(node, form.world_size_arg))
    return None


def collective_group(node: fx.Node) -> str:
    """The group a collective node runs on, as written in the graph (a platform op that names none:
    its implicit group's label)."""
    form = platform_form(node, op_forms.Collective)
    if form is not None:
        return str(op_forms.arg(node, form.group_arg)) if form.group_arg else form.implicit_group
    name = op_name(node)
    if name.startswith("vllm::"):
        return str(node.kwargs.get("group_name", node.args[-1]))
    if name.startswith("_c10d_functional::"):
        return str(node.kwargs.get("group_name", node.args[-1]))
    return "shm"


def same_size(a: Any, b: Any) -> bool:
    """Structural equality of two sizes (ints or SymInts), never guarding. A SymInt whose
    expression is a constant (a size Dynamo specialised) equals that int."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea, eb = (x.node.expr if isinstance(x, torch.SymInt) else x for x in (a, b))
        return bool(ea == eb)
    return a == b
