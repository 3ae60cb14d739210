"""Recognisers for the op forms vLLM's post-grad graphs contain (measured on vLLM 0.32 / torch 2.13).

Everything that asks "what kind of node is this?" lives here: matmuls (aten mm/addmm/linear/bmm,
`_C.onednn_mm` inside `auto_functionalized[_v2]`), TP all-reduces (`vllm.all_reduce`,
`_c10d_functional.all_reduce[_]` + `wait_tensor`, `_C.shm_allreduce` inside auto_functionalized),
other collectives, and the module-stack -> vLLM prefix translation.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

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
              "_C::onednn_mm", "_C::onednn_scaled_mm", "aten::_weight_int8pack_mm"}
EMBEDDING_OPS = {"aten::embedding"}


def is_matmul(node: fx.Node) -> bool:
    return op_name(node) in MATMUL_OPS


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
        creates its shared-memory all-reduce on the TP/PP groups only, so it is taken as TP's."""
        if self.form == "shm":
            return True
        return self.group_name in (group.c10d_name, group.vllm_name)


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


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


def collective_kind(node: fx.Node) -> str | None:
    return COLLECTIVE_OPS.get(op_name(node))


def collective_group(node: fx.Node) -> str:
    """The group a collective node runs on, as written in the graph."""
    name = op_name(node)
    if name.startswith("vllm::"):
        return str(node.kwargs.get("group_name", node.args[-1]))
    if name.startswith("_c10d_functional::"):
        return str(node.kwargs.get("group_name", node.args[-1]))
    return "shm"


def same_size(a: Any, b: Any) -> bool:
    """Structural equality of two sizes (ints or SymInts), never guarding."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        if not (isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt)):
            return False
        return a.node.expr == b.node.expr
    return a == b
