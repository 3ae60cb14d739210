"""Finding the matmul + collective pairs a fused kernel can replace (no graph changes here).

Owns the three shapes the rewritten graphs (and plain TP graphs) contain:

* `mm_all_reduce`:     matmul -> all_reduce                   (plain TP's row layers)
* `mm_reduce_scatter`: matmul -> [pad] -> reduce_scatter      (FlashComm1's row layers, FlashComm2's
                                                               OTP reduce-scatter)
* `all_gather_mm`:     all_gather -> [unpad] -> matmul        (FlashComm1's column layers)

in any of the collective forms the graphs use (`vllm.*`, `_c10d_functional.*` + `wait_tensor`,
vLLM's CPU `shm_allreduce`), and reads each matmul's operands (`Operands`): aten `mm` / `addmm`
with the [K, N] operand, vllm-ascend's `vllm.unquantized_gemm` and `npu.npu_quant_matmul` (W8A8
static or dynamic). A pair is only taken when the matmul's result feeds nothing but the collective
(through the pad), so replacing both changes nothing else.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms

KINDS = ("mm_all_reduce", "mm_reduce_scatter", "all_gather_mm")
COLLECTIVE_OF = {"mm_all_reduce": "all_reduce", "mm_reduce_scatter": "reduce_scatter",
                 "all_gather_mm": "all_gather"}


@dataclass
class Operands:
    """What a matmul node computes: x @ W (+ bias), W given either as the [K, N] operand of an aten
    mm (`w_kn`) or as the stored weight of a platform matmul (`weight`, `layout` "out_in" / "in_out")."""

    op: str                       # the matmul's op name
    x: fx.Node
    w_kn: fx.Node | None = None
    weight: fx.Node | None = None
    layout: str = "in_out"
    bias: fx.Node | None = None
    quant: str | None = None      # None | "w8a8" (static: per-channel dequant scale) | "w8a8_dynamic"
    scale: fx.Node | None = None  # the dequant scale (npu_quant_matmul's `scale`)
    pertoken_scale: fx.Node | None = None
    offset: fx.Node | None = None
    output_dtype: object = None
    refused: str | None = None    # why this matmul form cannot be fused at all


def operands(mm: fx.Node) -> Operands:
    name = gf.op_name(mm)
    if name == "aten::mm":
        return Operands(name, mm.args[0], w_kn=mm.args[1])
    if name == "aten::addmm":
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return Operands(name, mm.args[1], refused="matmul form: addmm with beta/alpha")
        return Operands(name, mm.args[1], w_kn=mm.args[2], bias=mm.args[0])
    form = gf.platform_form(mm, op_forms.Matmul)
    if form is not None and form.packed:
        return Operands(name, op_forms.arg(mm, form.x), refused=f"matmul form: the weight of {form.op} is packed "
                        "for its kernel; no fused kernel takes a packed weight")
    if form is not None:
        x, w, b = form.operands(mm)
        ops = Operands(name, x, weight=w, layout=form.weight_layout, bias=b)
        if form.quantized:
            ops.scale = op_forms.arg(mm, "scale")
            ops.pertoken_scale = op_forms.arg(mm, "pertoken_scale")
            ops.offset = op_forms.arg(mm, "offset")
            ops.output_dtype = op_forms.as_dtype(op_forms.arg(mm, "output_dtype"))  # `int?` in newer op-plugin
            ops.quant = "w8a8_dynamic" if ops.pertoken_scale is not None else "w8a8"
        return ops
    return Operands(name, mm.args[0] if mm.args else None, refused=f"matmul form: {name} is not fused")


@dataclass
class Pair:
    kind: str                      # one of KINDS
    matmul: fx.Node
    ops: Operands
    head: fx.Node                  # the collective node
    result: fx.Node                # the node whose users see the collective's result
    group: str                     # the group as the graph names it ("tp:0", a c10d name, "shm")
    group_size: int | None
    pad: fx.Node | None = None     # mm_reduce_scatter: the pad between matmul and reduce_scatter
    unpad: fx.Node | None = None   # all_gather_mm: the slice back to T rows after the all_gather
    erase: list = field(default_factory=list)   # nodes the fused op makes dead, in graph order

    @property
    def collective(self) -> str:
        return COLLECTIVE_OF[self.kind]


def _is_row_pad(n: fx.Node) -> bool:
    """constant_pad_nd(x, [0, 0, ..., 0, pad], 0): zero rows appended along dim 0 only."""
    if gf.op_name(n) != "aten::constant_pad_nd" or len(n.args) < 2:
        return False
    pads, value = list(n.args[1]), (n.args[2] if len(n.args) > 2 else n.kwargs.get("value", 0))
    return len(pads) >= 2 and all(isinstance(p, int) and p == 0 for p in pads[:-1]) and value == 0


def _rs_head(n: fx.Node):
    """(result node, group, size) of a sum reduce_scatter along dim 0, or None."""
    name = gf.op_name(n)
    if name == "vllm::reduce_scatter":
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        return (n, gf.collective_group(n), gf.collective_world_size(n)) if dim == 0 else None
    if name == "_c10d_functional::reduce_scatter_tensor":
        if str(n.args[1]).lower() != "sum":
            return None
        w = gf.wait_after(n)
        return (w, gf.collective_group(n), gf.collective_world_size(n)) if w is not None else None
    return None


def find_pairs(graph: fx.Graph) -> list[Pair]:
    """Every fusable pair of `graph`, in graph order."""
    pairs: list[Pair] = []
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        ar = gf.match_all_reduce(n)
        if ar is not None and ar.result is not None:
            mm = ar.input
            if isinstance(mm, fx.Node) and gf.is_matmul(mm) and len(mm.users) == 1:
                pairs.append(Pair("mm_all_reduce", mm, operands(mm), n, ar.result,
                                  ar.group_name or "shm", None, erase=[mm, *ar.nodes]))
            continue
        rs = _rs_head(n)
        if rs is not None:
            src, pad = gf.collective_input(n), None
            if isinstance(src, fx.Node) and _is_row_pad(src) and len(src.users) == 1:
                pad, src = src, src.args[0]
            if isinstance(src, fx.Node) and gf.is_matmul(src) and len(src.users) == 1:
                result, group, size = rs
                pairs.append(Pair("mm_reduce_scatter", src, operands(src), n, result, group, size, pad=pad,
                                  erase=[src] + ([pad] if pad else []) + ([n, result] if result is not n else [n])))
            continue
        ag = gf.all_gather_rows(n)
        if ag is not None:
            result, group, size = ag
            unpads = [u for u in result.users if gf.is_unpad(u, result)]
            val = unpads[0] if len(unpads) == 1 else result
            for u in val.users:
                if u.op == "call_function" and gf.is_matmul(u):
                    ops = operands(u)
                    if ops.x is val:
                        pairs.append(Pair("all_gather_mm", u, ops, n, result, group, size,
                                          unpad=val if val is not result else None,
                                          erase=[u] + ([val] if val is not result else [])
                                          + ([n, result] if result is not n else [n])))
                        break
    return pairs


def getitem(graph: fx.Graph, node: fx.Node, i: int) -> fx.Node:
    return graph.call_function(operator.getitem, (node, i))


#: the fused ops' collectives, for `fxpasses.comm_volume`: op -> (collective, bytes measured on,
#: tensor argument, group-size argument or None, group argument). "out": the op's output (a fused
#: all-reduce sends what it returns), "out_x_n": its output x group size (the full, padded tensor a
#: reduce-scatter reduces), "in_x_n": the argument x group size (what an all-gather gathers). The
#: bytes are those of the collective inside the kernel: the pair's own, never more.
FUSED_COLLECTIVES = {
    "fxpasses::mm_all_reduce": ("all_reduce", "out", "x", "group_size", "group_name"),
    "fxpasses::mm_reduce_scatter": ("reduce_scatter", "out_x_n", "x", "group_size", "group_name"),
    "fxpasses::all_gather_mm": ("all_gather", "in_x_n", "x", "group_size", "group_name"),
    "npu::npu_mm_all_reduce_base": ("all_reduce", "out", "x1", None, "hcom"),
    "npu::npu_mm_reduce_scatter_base": ("reduce_scatter", "out_x_n", "self", "world_size", "hcom"),
    "npu::npu_all_gather_base_mm": ("all_gather", "in_x_n", "self", "world_size", "hcom"),
    "symm_mem::fused_matmul_reduce_scatter": ("reduce_scatter", "out_x_n", "A", None, "group_name"),
    "symm_mem::fused_all_gather_matmul": ("all_gather", "in_x_n", "A", None, "group_name"),
}
#: one-time transfers of the lowering (never per step): op -> (group argument, group-size argument)
ONE_TIME = {"fxpasses::rank0_bias": ("group_name", "group_size")}
