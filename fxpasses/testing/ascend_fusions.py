"""vllm-ascend's default graph fusions, re-enacted on graphs of the NPU stand-in ops (test support).

vllm-ascend's `GraphFusionPassManager.configure` (main of 2026-08-22) appends, in this order and each
on unless `additional_config["ascend_compilation_config"]` turns it off, the passes that run before
any pass added under its key (fxpasses):

  fuse_norm_quant   AddRMSNormQuantFusionPass: `npu_add_rms_norm` (or `_C_ascend.npu_add_rms_norm_bias`)
                    whose normed output feeds only `vllm.quantize` -> `npu_add_rms_norm_quant(x1, x2,
                    gamma, scale, offset, beta=bias, epsilon=eps)` (its [0] the int8 values, [2] the
                    residual sum); feeding only `npu_dynamic_quant` -> `npu_add_rms_norm_dynamic_quant(x1,
                    x2, gamma, epsilon=eps, output_mask=[True, False], beta=bias)` ([0] int8, [3] the
                    per-token scale, [2] the residual sum)
  fuse_qknorm_rope  QKNormRopeFusionPass: qkv split, per-head `npu_rms_norm` of q and k, then
                    `npu_rotary_embedding` (neox, whole head) -> `vllm.qkv_rmsnorm_rope(qkv, cos_sin_cache,
                    positions, q_weight, k_weight, q_size, kv_size, head_dim, eps)`, its outputs the
                    rotated q and k and v (matched in bfloat16 with head size 128 there; any dtype and
                    head size here)
  fuse_muls_add     MulsAddFusionPass: `x * scale + y` (scale the model's routed_scaling_factor, 1.0
                    by default) -> `vllm.muls_add(x, y, scale)`

`run_default_fusions(graph)` applies them in that order (the dtype and chip guards of the real
passes are not re-enacted: the stand-in graphs are float64 on purpose) and returns how many each
replaced. New nodes get their fake values from the stand-ins' fake kernels, so fxpasses reads them
as it reads any traced node.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.op_forms import arg
from fxpasses.testing.npu_standin import ensure_npu_standin_ops

#: vllm-ascend's order, with each pass's `ascend_compilation_config` switch
DEFAULT_ORDER = ("fuse_norm_quant", "fuse_qknorm_rope", "fuse_muls_add")
_NORMS = ("npu::npu_add_rms_norm", "_C_ascend::npu_add_rms_norm_bias")


def _getitems(node: fx.Node) -> dict[int, fx.Node]:
    """The used outputs of a multi-output node (an unused getitem is dead code, as after DCE)."""
    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.users}


def _fake(node: fx.Node) -> None:
    """node.meta["val"] from the op's fake kernel on its inputs' fake values."""
    def v(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a
    args = torch.fx.node.map_aggregate(node.args, v)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, v)
    if node.target is operator.getitem:
        node.meta["val"] = args[0][args[1]]
        return
    from torch._guards import detect_fake_mode
    with detect_fake_mode([a for a in args if isinstance(a, torch.Tensor)]):
        node.meta["val"] = node.target(*args, **kwargs)


def _call(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
    n = graph.call_function(target, args, kwargs or {})
    if like is not None:
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in like.meta:
                n.meta[k] = like.meta[k]
    _fake(n)
    return n


def fuse_norm_quant(graph: fx.Graph) -> int:
    ensure_npu_standin_ops()
    done = 0
    for norm in list(graph.nodes):
        if norm.op != "call_function" or gf.op_name(norm) not in _NORMS:
            continue
        items = _getitems(norm)
        if 0 not in items or set(items) - {0, 2} or len(items[0].users) != 1:
            continue  # the normed output used elsewhere, or rstd used: the pattern does not match
        quant = next(iter(items[0].users))
        beta = arg(norm, "beta") if gf.op_name(norm).startswith("_C_ascend") else None
        x1, x2, gamma, eps = arg(norm, "x1"), arg(norm, "x2"), arg(norm, "gamma"), arg(norm, "epsilon")
        name = gf.op_name(quant)
        at = norm.next  # new nodes in creation order right after the norm (its residual's users follow it)
        if name == "vllm::quantize" and arg(quant, "in_tensor") is items[0]:
            with graph.inserting_before(at):
                fused = _call(graph, torch.ops.npu.npu_add_rms_norm_quant.default,
                              (x1, x2, gamma, arg(quant, "input_scale"), arg(quant, "input_offset")),
                              {"beta": beta, "epsilon": eps}, like=norm)
                q = _call(graph, operator.getitem, (fused, 0), like=quant)
            quant.replace_all_uses_with(q)
            outs = {2: 2}
        elif name == "npu::npu_dynamic_quant" and arg(quant, "input") is items[0] \
                and arg(quant, "smooth_scales") is None and set(_getitems(quant)) <= {0, 1}:
            with graph.inserting_before(at):
                fused = _call(graph, torch.ops.npu.npu_add_rms_norm_dynamic_quant.default, (x1, x2, gamma),
                              {"beta": beta, "epsilon": eps, "output_mask": [True, False]}, like=norm)
                for i, j in ((0, 0), (1, 3)):
                    old = _getitems(quant).get(i)
                    if old is not None:
                        old.replace_all_uses_with(_call(graph, operator.getitem, (fused, j), like=quant))
        else:
            continue
        if 2 in items:  # the residual sum x1 + x2 is output 2 of the norm and of both fused ops
            with graph.inserting_before(at):
                items[2].replace_all_uses_with(_call(graph, operator.getitem, (fused, 2), like=norm))
        _erase_unused(graph, [quant, items[2]] if 2 in items else [quant])
        done += 1
    return done


_VIEWS = ("aten::view", "aten::reshape", "aten::_unsafe_view")


def _through_views(n: Any) -> Any:
    while isinstance(n, fx.Node) and n.op == "call_function" and gf.op_name(n) in _VIEWS and len(n.users) == 1:
        n = n.args[0]
    return n


def _normed_split(n: Any) -> tuple[fx.Node, fx.Node, int] | None:
    """(the norm, the split, which chunk) when `n` is (views of) npu_rms_norm's output of (views of)
    one chunk of a split of the qkv output, the norm used only there."""
    y = _through_views(n)
    if not (isinstance(y, fx.Node) and y.target is operator.getitem and y.args[1] == 0):
        return None
    norm = y.args[0]
    if gf.op_name(norm) != "npu::npu_rms_norm" or set(_getitems(norm)) != {0} or len(y.users) != 1:
        return None
    chunk = _through_views(arg(norm, "self"))
    if not (isinstance(chunk, fx.Node) and chunk.target is operator.getitem
            and gf.op_name(chunk.args[0]) in ("aten::split_with_sizes", "aten::split")):
        return None
    return norm, chunk.args[0], chunk.args[1]


def _erase_unused(graph: fx.Graph, start: list[fx.Node]) -> None:
    """Erase `start` and, through their inputs, every node left without a user by that."""
    work, erased = list(start), set()
    while work:
        n = work.pop()
        if n in erased or n.op != "call_function":
            continue
        if any(u.users or u.target is not operator.getitem for u in n.users):
            continue  # used (an unused getitem of a multi-output node does not count)
        for u in list(n.users):
            graph.erase_node(u)
            erased.add(u)
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        work += inputs


def fuse_qknorm_rope(graph: fx.Graph) -> int:
    """split -> per-head npu_rms_norm of q and of k -> npu_rotary_embedding (neox, the whole head
    rotated) -> `vllm.qkv_rmsnorm_rope` (see the module docstring)."""
    ensure_npu_standin_ops()
    done = 0
    for rope in list(graph.nodes):
        if rope.op != "call_function" or gf.op_name(rope) != "vllm::npu_rotary_embedding":
            continue
        q, k = _normed_split(arg(rope, "query")), _normed_split(arg(rope, "key"))
        if q is None or k is None or q[1] is not k[1] or (q[2], k[2]) != (0, 1):
            continue
        split = q[1]
        sizes = split.args[1]
        head = arg(rope, "head_size")
        (qn, _, _), (kn, _, _) = q, k
        if not (isinstance(sizes, (list, tuple)) and len(sizes) == 3 and arg(rope, "is_neox_style") is True
                and arg(rope, "rotary_dim") == head and arg(rope, "offsets") is None
                and split.args[2:] in ((-1,), (1,)) and arg(qn, "epsilon") == arg(kn, "epsilon")):
            continue  # the fused op takes one eps for both norms
        chunks = _getitems(split)
        order = {n: i for i, n in enumerate(graph.nodes)}
        inputs = [a for a in (split, arg(rope, "cos_sin_cache"), arg(rope, "positions")) if isinstance(a, fx.Node)]
        at = max(inputs, key=order.__getitem__)  # right after its last input: before every user it takes over
        with graph.inserting_before(at.next):
            fused = _call(graph, torch.ops.vllm.qkv_rmsnorm_rope.default,
                          (split.args[0], arg(rope, "cos_sin_cache"), arg(rope, "positions"), arg(qn, "gamma"),
                           arg(kn, "gamma"), sizes[0], sizes[1], head, arg(qn, "epsilon")), like=rope)
            new = [_call(graph, operator.getitem, (fused, i), like=rope) for i in range(3)]
        for i, old in _getitems(rope).items():
            old.replace_all_uses_with(new[i])
        if 2 in chunks:
            chunks[2].replace_all_uses_with(new[2])
        _erase_unused(graph, [rope, *([chunks[2]] if 2 in chunks else [])])
        done += 1
    return done


def fuse_muls_add(graph: fx.Graph, scale: float = 1.0) -> int:
    ensure_npu_standin_ops()
    done = 0
    for add in list(graph.nodes):
        if add.target is not torch.ops.aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
            continue
        mul, y = add.args
        if not (isinstance(mul, fx.Node) and mul.target is torch.ops.aten.mul.Tensor and len(mul.users) == 1
                and isinstance(mul.args[0], fx.Node) and mul.args[1] == scale and isinstance(y, fx.Node)):
            continue
        xv, yv = mul.args[0].meta.get("val"), y.meta.get("val")
        if not (isinstance(xv, torch.Tensor) and isinstance(yv, torch.Tensor) and xv.shape == yv.shape):
            continue
        with graph.inserting_before(add):
            fused = _call(graph, torch.ops.vllm.muls_add.default, (mul.args[0], y, float(scale)), like=add)
        add.replace_all_uses_with(fused)
        graph.erase_node(add)
        graph.erase_node(mul)
        done += 1
    return done


def run_default_fusions(graph: fx.Graph, ascend_compilation_config: dict[str, Any] | None = None,
                        routed_scaling_factor: float = 1.0) -> dict[str, int]:
    """vllm-ascend's default fusions in its order; {switch: replacements} for the ones switched on."""
    cfg = ascend_compilation_config or {}
    passes = {"fuse_norm_quant": fuse_norm_quant, "fuse_qknorm_rope": fuse_qknorm_rope,
              "fuse_muls_add": lambda g: fuse_muls_add(g, routed_scaling_factor)}
    out = {}
    for switch in DEFAULT_ORDER:
        if cfg.get(switch, True):
            out[switch] = passes[switch](graph)
    graph.lint()
    return out
