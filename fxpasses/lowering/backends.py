"""The fused-kernel backends: per platform, which op replaces each pair, when it may not (and why),
and how its call is written into the graph.

A backend is a record (`Backend`): its name, its op per pair kind (or the reason it has none), a
`refuse(pair, site)` check and an `emit(graph, pair, site)` writer. Three exist:

* `reference` (CPU, any platform): `fxpasses::mm_all_reduce`, `fxpasses::mm_reduce_scatter`,
  `fxpasses::all_gather_mm` (`fxpasses.lowering.ops`): matmul + the collective over the c10d group,
  so the lowering is proven numerically on gloo. aten mm/addmm only; it fuses float matmuls.
* `npu` (torch_npu): `npu.npu_mm_all_reduce_base`, `npu.npu_mm_reduce_scatter_base`,
  `npu.npu_all_gather_base_mm` (schemas from Ascend/op-plugin `op_plugin/config/op_plugin_functions.yaml`,
  limits from `docs/zh/custom_APIs/torch_npu/torch_npu-npu_*.md`; matmul + reduce-scatter at most 8
  ranks, and `comm_mode` by chip family, as vllm-ascend main of 2026-08-22), over the TP group's HCCL
  communicator, named at worker start (`fxpasses.lowering.groups`). A platform weight stored
  [N, K] (`vllm.unquantized_gemm`) is passed transposed, so only with `weight_format` nd / nd_float
  (an NZ weight has no transposed view).
* `cuda` (torch symmetric memory): `symm_mem.fused_matmul_reduce_scatter`,
  `symm_mem.fused_all_gather_matmul`, on groups with symmetric memory enabled at worker start.
  symm_mem has no fused matmul + all-reduce: plain TP's row layers stay as they are.

Bias. vLLM adds a row layer's bias on TP rank 0 only, so only rank 0's graph has it, and every
rank must still emit the same kernels. A matmul-all-reduce takes it into the kernel on rank 0
(`bias=`, added once before the reduction, as the seed did). A fused reduce-scatter that takes no
bias (torch_npu: "non-zero bias not supported yet"; symm_mem: no bias argument) is followed on
every rank by `fxpasses::rank0_bias` (the term rank 0's matmul added, shared once per weight
version, never per step) added to the rank's chunk; for W8A8 the term is the seed's correction
`quant_bias * deq_scale`, computed on rank 0 with rank 0's scale. A column layer's bias (on every
rank) is added after an all-gather-matmul. Padding: the activation gets the zero rows the
reduce-scatter's input had (the kernels need rows divisible by the group size).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.lowering import groups
from fxpasses.lowering.match import Pair

aten = torch.ops.aten


@dataclass
class Site:
    """A pair as the backend sees it: the group resolved, the prefix for keys and reports."""

    pair: Pair
    prefix: str
    c10d_name: str
    vllm_name: str | None
    size: int
    is_tp: bool
    ag_input: fx.Node | None = None   # all_gather_mm: what the all_gather sends (this rank's rows)
    weight_format: str = "unknown"    # the configuration's weight_format (Ascend NZ, see fxpasses.op_forms)


@dataclass(frozen=True)
class Backend:
    name: str
    ops: dict                                  # kind -> op name, or None
    no_op: dict                                # kind -> why the backend has no kernel for it
    refuse: Callable[[Site], str | None]
    # returns the node that replaces pair.result; all_gather_mm: (matmul output [T_pad rows], gathered input)
    emit: Callable[[fx.Graph, Site], object]

    def op_for(self, kind: str) -> str | None:
        return self.ops.get(kind)


# ---- emission helpers ---------------------------------------------------------------------------------

def call(graph: fx.Graph, target, args, kwargs=None, like: fx.Node | None = None) -> fx.Node:
    """A new node with meta["val"] from its (fake) inputs, and the module stack of `like`."""
    n = graph.call_function(target, tuple(args), kwargs or {})
    if like is not None:
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k in like.meta:
                n.meta[k] = like.meta[k]
    n.meta["val"] = fake_value(n)
    return n


def fake_value(n: fx.Node):
    from torch._guards import detect_fake_mode

    args = fx.node.map_arg(n.args, lambda a: a.meta.get("val"))
    kwargs = fx.node.map_arg(n.kwargs, lambda a: a.meta.get("val"))
    flat = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    mode = detect_fake_mode(flat)
    if mode is None:
        return None
    try:
        with mode:
            return n.target(*args, **kwargs)
    except Exception as e:
        raise RuntimeError(f"fake value of {n.target} ({n.name}) with {args} {kwargs}: {e}") from e


def _item(graph: fx.Graph, n: fx.Node, i: int, val: bool = True) -> fx.Node:
    import operator

    g = graph.call_function(operator.getitem, (n, i))
    _copy_meta(g, n)
    if val:
        g.meta["val"] = n.meta["val"][i]
    return g


def set_val(n: fx.Node, v) -> fx.Node:
    n.meta["val"] = v
    return n


def _x_rows_padded(graph: fx.Graph, site: Site, x: fx.Node) -> fx.Node:
    """The matmul's activation with the pad the reduce-scatter's input had (zero rows appended)."""
    pad = site.pair.pad
    if pad is None:
        return x
    xv = gf.val(x)
    # the rows the pad node had (its fake kernel wants concrete pads under some shape environments)
    zero = 0.0 if xv.is_floating_point() else 0
    n = graph.call_function(aten.constant_pad_nd.default, (x, list(pad.args[1]), zero))
    _copy_meta(n, pad)
    return set_val(n, xv.new_empty((gf.val(pad).shape[0], *xv.shape[1:])))


def _k_n_weight(graph: fx.Graph, site: Site) -> fx.Node:
    """The [K, N] weight operand (the aten mm's, or a platform matmul's weight transposed if stored [N, K])."""
    ops = site.pair.ops
    if ops.w_kn is not None:
        return ops.w_kn
    if ops.layout == "in_out":
        return ops.weight
    return call(graph, aten.permute.default, (ops.weight, [1, 0]), like=site.pair.matmul)


def _dtype(site: Site):
    v = gf.val(site.pair.matmul)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _k(site: Site):
    v = gf.val(site.pair.ops.x)
    return v.shape[-1] if isinstance(v, torch.Tensor) else None


def _n(site: Site):
    v = gf.val(site.pair.matmul)
    return v.shape[-1] if isinstance(v, torch.Tensor) else None


def _add_rank0_bias(graph: fx.Graph, site: Site, out: fx.Node) -> fx.Node:
    """out + the row bias term TP rank 0's graph holds, on every rank. The term is what rank 0's matmul
    added to its partial: a float bias as it is; W8A8's integer quant bias times rank 0's dequant
    scale (the seed's `quant_bias * deq_scale` correction). Rank 0 computes it, `fxpasses::rank0_bias`
    shares it once per weight version, and every rank adds it to its chunk."""
    ops, mm = site.pair.ops, site.pair.matmul
    term = ops.bias
    bv = gf.val(term) if term is not None else None
    if term is not None and ops.quant and bv is not None and not bv.is_floating_point():
        term = call(graph, aten.mul.Tensor, (call(graph, aten._to_copy.default, (term,), {"dtype": torch.float64},
                                                   like=mm), ops.scale), like=mm)
    like = ops.weight if ops.weight is not None else ops.w_kn
    key = f"{site.prefix}|rank0_bias|{site.c10d_name}"
    share = torch.promote_types(_dtype(site), torch.float32)
    b = call(graph, torch.ops.fxpasses.rank0_bias.default,
             (term, like, key, site.c10d_name, site.size, int(_n(site)), share), like=mm)
    b = call(graph, aten._to_copy.default, (b,), {"dtype": _dtype(site)}, like=mm)
    return call(graph, aten.add.Tensor, (out, b), like=mm)


# ---- reference ------------------------------------------------------------------------------------------

def _ref_refuse(site: Site) -> str | None:
    ops = site.pair.ops
    if ops.quant:
        return (f"quantization scheme: {ops.quant} ({ops.op}); the reference backend fuses float aten matmuls "
                "(W8A8 is fused by the npu backend)")
    if ops.w_kn is None:
        return f"matmul form: {ops.op}; the reference backend fuses aten mm/addmm"
    return None


def _ref_emit(graph: fx.Graph, site: Site) -> fx.Node:
    p, ops = site.pair, site.pair.ops
    lib = torch.ops.fxpasses
    if p.kind == "mm_all_reduce":
        return call(graph, lib.mm_all_reduce.default, (ops.x, ops.w_kn, ops.bias, site.c10d_name, site.size), like=p.matmul)
    if p.kind == "mm_reduce_scatter":
        x = _x_rows_padded(graph, site, ops.x)
        return call(graph, lib.mm_reduce_scatter.default, (x, ops.w_kn, ops.bias, site.c10d_name, site.size),
                    like=p.matmul)
    fused = call(graph, lib.all_gather_mm.default, (site.ag_input, ops.w_kn, ops.bias, site.c10d_name, site.size),
                 like=p.matmul)
    return _item(graph, fused, 0), _item(graph, fused, 1)


REFERENCE = Backend("reference", {"mm_all_reduce": "fxpasses::mm_all_reduce",
                                  "mm_reduce_scatter": "fxpasses::mm_reduce_scatter",
                                  "all_gather_mm": "fxpasses::all_gather_mm"}, {}, _ref_refuse, _ref_emit)


# ---- npu ------------------------------------------------------------------------------------------------

NPU_WORLD_SIZES = (2, 4, 8, 16, 32)   # A2: 2, 4, 8 (all-mesh); A3: 2 ... 32 (double ring)
#: npu_mm_reduce_scatter_base does not work at 16 ranks: vllm-ascend fuses it only up to 8 (#6168,
#: `mmrs_fusion = tp_world_size <= 8` "until it supports tp_size >= 16")
NPU_MM_REDUCE_SCATTER_MAX_RANKS = 8
#: Ascend chip families by torch_npu's numeric SOC version (`torch_npu.npu.get_soc_version()`), as
#: vllm-ascend's device/hardware.py reads them: (lowest, highest, family)
NPU_SOC_FAMILIES = ((200, 205, "310P"), (220, 225, "A2"), (250, 255, "A3"), (260, 260, "A5"))
#: the fused kernels' comm_mode per family (vllm-ascend #12689: newer CANN refuses "aiv" on A5, Ascend
#: 950, which takes "ai_cpu", or "ccu" when HCCL_OP_EXPANSION_MODE=CCU_SCHED); "aiv" elsewhere
NPU_COMM_MODE = {"A5": "ai_cpu"}
NPU_COMM_MODE_CCU = ("HCCL_OP_EXPANSION_MODE", "CCU_SCHED", "ccu")
NPU_K_RANGE = (256, 65535)            # mm_reduce_scatter / all_gather_mm: k in [256, 65535)
NPU_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_NPU_OPS = {"mm_all_reduce": "npu_mm_all_reduce_base", "mm_reduce_scatter": "npu_mm_reduce_scatter_base",
            "all_gather_mm": "npu_all_gather_base_mm"}


def npu_family(soc_version: int | None) -> str | None:
    """The chip family of a numeric SOC version, None when unknown (no torch_npu, or a new chip)."""
    for lo, hi, family in NPU_SOC_FAMILIES:
        if soc_version is not None and lo <= soc_version <= hi:
            return family
    return None


def npu_comm_mode(soc_version: int | None, env: Mapping[str, str]) -> str:
    """The comm_mode every fused kernel is called with on this chip (the same on every rank: one
    deployment runs one chip family and one HCCL setting)."""
    family = npu_family(soc_version)
    var, value, mode = NPU_COMM_MODE_CCU
    if family == "A5" and env.get(var) == value:
        return mode
    return NPU_COMM_MODE.get(family or "", "aiv")


def npu_group_refusal(kind: str, size: int) -> str | None:
    """Why a fused `kind` kernel cannot run over `size` ranks, or None."""
    if size not in NPU_WORLD_SIZES:
        return f"group: {size} ranks; the fused kernels take {list(NPU_WORLD_SIZES)}"
    if kind == "mm_reduce_scatter" and size > NPU_MM_REDUCE_SCATTER_MAX_RANKS:
        return (f"group: {size} ranks; npu_mm_reduce_scatter_base fails above {NPU_MM_REDUCE_SCATTER_MAX_RANKS} "
                "(vllm-ascend stops there too), so the pair stays unfused")
    return None


@functools.cache
def soc_version() -> int | None:
    """torch_npu's numeric SOC version of this process's NPU (one per process: read once)."""
    try:
        import torch_npu
        return int(torch_npu.npu.get_soc_version())
    except Exception:  # no torch_npu (the stand-ins): the A2/A3 default
        return None


def _npu_op(kind: str):
    ns = getattr(torch.ops, "npu", None)
    try:
        return getattr(ns, _NPU_OPS[kind]).default if ns is not None else None
    except AttributeError:
        return None


def _npu_refuse(site: Site) -> str | None:
    p, ops = site.pair, site.pair.ops
    if _npu_op(p.kind) is None:
        return f"backend unavailable: torch.ops.npu.{_NPU_OPS[p.kind]} is not registered (torch_npu not loaded)"
    if not site.is_tp:
        return (f"group: {site.c10d_name} is not the TP group; Atlas A2 runs every fused communication kernel of "
                "a model in one communication domain, so only TP's pairs are fused")
    if groups.hcom_name(site.c10d_name) is None:
        return (f"group: no HCCL communicator name recorded for {site.c10d_name} (recorded at worker start by "
                "fxpasses.worker_groups.prepare_process_groups with lowering: auto)")
    refused = npu_group_refusal(p.kind, site.size)
    if refused:
        return refused
    if ops.refused:
        return ops.refused
    xv = gf.val(ops.x)
    if isinstance(xv, torch.Tensor) and xv.dtype not in NPU_DTYPES:
        return f"dtype: {xv.dtype}; the fused kernels take float16, bfloat16 (or int8 W8A8)"
    if ops.quant and p.kind != "mm_reduce_scatter":
        return (f"quantization scheme: {ops.quant}; the seed fuses W8A8 only into the reduce-scatter "
                "(matmul-allreduce and all-gather-matmul keep float layers)")
    if ops.quant == "w8a8_dynamic":
        return "quantization scheme: W8A8 dynamic (per-token scale); the seed's fused reduce-scatter is W8A8 static"
    if ops.offset is not None:
        return "quantization scheme: an activation offset in the quantised matmul; the fused kernel takes none"
    k = _k(site)
    if p.kind != "mm_all_reduce" and isinstance(k, int) and not (NPU_K_RANGE[0] <= k < NPU_K_RANGE[1]):
        return f"shape: k={k}; npu_{_NPU_OPS[p.kind][4:]} takes k in [{NPU_K_RANGE[0]}, {NPU_K_RANGE[1]})"
    if p.kind == "mm_all_reduce" and isinstance(k, int) and k > 65535:
        return f"shape: k={k} > 65535"
    if ops.weight is not None and ops.w_kn is None and ops.layout not in ("out_in", "in_out"):
        return f"matmul form: weight layout {ops.layout}"
    if ops.w_kn is None and ops.layout == "out_in" and site.weight_format in ("unknown", "nz"):
        return (f"weight format: {ops.op}'s [N, K] weight may be in NZ (weight_format: {site.weight_format}); the "
                "fused kernels take it transposed, which an NZ weight is not: declare plain weights "
                "(weight_format: nd or nd_float, vllm-ascend's weight_nz_mode 0/1) to fuse")
    return None


def _npu_emit(graph: fx.Graph, site: Site) -> fx.Node:
    p, ops = site.pair, site.pair.ops
    hcom = groups.hcom_name(site.c10d_name)
    w = _k_n_weight(graph, site)
    mode = npu_comm_mode(soc_version(), os.environ)
    if p.kind == "mm_all_reduce":
        return call(graph, _npu_op(p.kind), (ops.x, w, hcom), {"reduce_op": "sum", "bias": ops.bias, "comm_mode": mode},
                    like=p.matmul)
    if p.kind == "mm_reduce_scatter":
        x = _x_rows_padded(graph, site, ops.x)
        # output_dtype is `ScalarType?` in op-plugin's schema of this kernel: a torch.dtype (the quantised
        # kernels' `int?` dtype codes belong to npu_quant_mm_reduce_scatter, which is not emitted)
        kw = {"reduce_op": "sum", "bias": None, "comm_turn": 0, "comm_mode": mode}
        if ops.quant:
            kw.update(x2_scale=ops.scale, output_dtype=ops.output_dtype or _dtype(site))
        out = call(graph, _npu_op(p.kind), (x, w, hcom, site.size), kw, like=p.matmul)
        return _add_rank0_bias(graph, site, out)
    fused = call(graph, _npu_op(p.kind), (site.ag_input, w, hcom, site.size),
                 {"bias": None, "gather_index": 0, "gather_output": True, "comm_turn": 0, "comm_mode": mode},
                 like=p.matmul)
    out, gathered = _item(graph, fused, 0), _item(graph, fused, 1)
    if ops.bias is not None:  # a column layer's bias, on every rank (the kernel takes no non-zero bias)
        out = call(graph, aten.add.Tensor, (out, ops.bias), like=p.matmul)
    return out, gathered


NPU = Backend("npu", {k: f"npu::{v}" for k, v in _NPU_OPS.items()}, {}, _npu_refuse, _npu_emit)


# ---- cuda (symmetric memory) ------------------------------------------------------------------------

_CUDA_NO_AR = ("no fused matmul + all-reduce in torch symm_mem (it has fused_matmul_reduce_scatter and "
               "fused_all_gather_matmul); the pair stays matmul + all_reduce")


def _symm_op(name: str):
    try:
        import torch.distributed._symmetric_memory  # noqa: F401  (registers the symm_mem ops)
        return getattr(torch.ops.symm_mem, name).default
    except (ImportError, AttributeError, RuntimeError):
        return None


def _cuda_refuse(site: Site) -> str | None:
    p, ops = site.pair, site.pair.ops
    if p.kind == "mm_all_reduce":
        return _CUDA_NO_AR
    name = "fused_matmul_reduce_scatter" if p.kind == "mm_reduce_scatter" else "fused_all_gather_matmul"
    if _symm_op(name) is None:
        return f"backend unavailable: torch.ops.symm_mem.{name} is not registered in this torch"
    if not groups.symm_mem_enabled(site.c10d_name):
        return (f"group: symmetric memory is not enabled for {site.c10d_name} (enable_symm_mem_for_group runs at "
                "worker start, fxpasses.worker_groups.prepare_process_groups with lowering: auto, on NCCL groups)")
    if ops.refused:
        return ops.refused
    if ops.quant:
        return f"quantization scheme: {ops.quant}; the symm_mem kernels are float matmuls"
    if ops.w_kn is None:
        return f"matmul form: {ops.op}; the cuda backend fuses aten mm/addmm"
    return None


def _cuda_emit(graph: fx.Graph, site: Site) -> fx.Node:
    p, ops = site.pair, site.pair.ops
    if p.kind == "mm_reduce_scatter":
        x = _x_rows_padded(graph, site, ops.x)
        xv, wv = gf.val(x), gf.val(ops.w_kn)
        out = graph.call_function(_symm_op("fused_matmul_reduce_scatter"), (x, ops.w_kn, "sum", 0, site.c10d_name))
        _copy_meta(out, p.matmul)
        set_val(out, xv.new_empty((xv.shape[0] // site.size, wv.shape[1])))
        return _add_rank0_bias(graph, site, out)
    xv, wv = gf.val(site.ag_input), gf.val(ops.w_kn)
    rows = xv.shape[0] * site.size
    res = graph.call_function(_symm_op("fused_all_gather_matmul"), (site.ag_input, [ops.w_kn], 0, site.c10d_name),
                              {"return_A": True})
    _copy_meta(res, p.matmul)
    gathered_v, out_v = xv.new_empty((rows, *xv.shape[1:])), xv.new_empty((rows, wv.shape[1]))
    set_val(res, (gathered_v, [out_v]))
    gathered = set_val(_item(graph, res, 0, val=False), gathered_v)
    outs = set_val(_item(graph, res, 1, val=False), [out_v])
    out = set_val(_item(graph, outs, 0, val=False), out_v)
    if ops.bias is not None:
        out = call(graph, aten.add.Tensor, (out, ops.bias), like=p.matmul)
    return out, gathered


def _copy_meta(n: fx.Node, like: fx.Node) -> None:
    for k in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if k in like.meta:
            n.meta[k] = like.meta[k]


CUDA = Backend("cuda", {"mm_reduce_scatter": "symm_mem::fused_matmul_reduce_scatter",
                        "all_gather_mm": "symm_mem::fused_all_gather_matmul"},
               {"mm_all_reduce": _CUDA_NO_AR}, _cuda_refuse, _cuda_emit)

BACKENDS = {b.name: b for b in (REFERENCE, NPU, CUDA)}
