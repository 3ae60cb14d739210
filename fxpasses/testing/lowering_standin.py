"""Test support for the lowering: stand-ins of torch_npu's fused matmul + communication kernels and
rank functions that lower a captured graph with a given backend and describe what it emitted.

The stand-ins carry the exact schemas of Ascend/op-plugin (`op_plugin/config/op_plugin_functions.yaml`,
commit 517f2e7d), with fake kernels and CPU kernels that decompose the documented formulas over
gloo (the `hcom` string names a c10d group through `HCOM_GROUPS`, which `register_standin_hcom`
fills on both sides: here for the kernels, in `fxpasses.lowering.groups` for the lowering). They
are never imported by the core.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

SCHEMAS = {
    "npu::npu_mm_all_reduce_base": (
        "(Tensor x1, Tensor x2, str hcom, *, str reduce_op='sum', Tensor? bias=None, Tensor? antiquant_scale=None, "
        "Tensor? antiquant_offset=None, Tensor? x3=None, Tensor? dequant_scale=None, Tensor? pertoken_scale=None, "
        "Tensor? comm_quant_scale_1=None, Tensor? comm_quant_scale_2=None, int antiquant_group_size=0, "
        "int comm_turn=0, int[]? group_sizes=None, int? y_dtype=None, int? x1_dtype=None, int? x2_dtype=None, "
        "int? dequant_scale_dtype=None, int? pertoken_scale_dtype=None, int comm_quant_mode=0, "
        "str? comm_mode=None) -> Tensor"),
    "npu::npu_mm_reduce_scatter_base": (
        "(Tensor self, Tensor x2, str hcom, int world_size, *, str reduce_op='sum', Tensor? bias=None, "
        "Tensor? x1_scale=None, Tensor? x2_scale=None, int comm_turn=0, ScalarType? output_dtype=None, "
        "str? comm_mode=None) -> Tensor"),
    "npu::npu_all_gather_base_mm": (
        "(Tensor self, Tensor x2, str hcom, int world_size, *, Tensor? bias=None, Tensor? x1_scale=None, "
        "Tensor? x2_scale=None, int gather_index=0, bool gather_output=True, int comm_turn=0, "
        "ScalarType? output_dtype=None, str? comm_mode=None) -> (Tensor, Tensor)"),
}

HCOM_GROUPS: dict[str, str] = {}   # hcom name -> c10d group name


def _pg(hcom: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(HCOM_GROUPS[hcom])


def _mm_all_reduce(x1, x2, hcom, *, reduce_op="sum", bias=None, **_):
    import torch.distributed as dist

    out = torch.mm(x1, x2) if bias is None else torch.addmm(bias, x1, x2)
    dist.all_reduce(out, group=_pg(hcom))
    return out


def _mm_all_reduce_fake(x1, x2, hcom, *, reduce_op="sum", bias=None, **_):
    return x1.new_empty((*x1.shape[:-1], x2.shape[-1]))


def _scaled(x1, x2, bias, x1_scale, x2_scale, output_dtype):
    if x2_scale is None:  # the base scenario: output = x1 @ x2 + bias, in x1's dtype
        return torch.mm(x1, x2) if bias is None else torch.addmm(bias, x1, x2)
    acc = x1.to(torch.float64) @ x2.to(torch.float64)           # exact for int8 operands
    if bias is not None:
        acc = acc + bias.to(torch.float64)
    out = acc * x2_scale.to(torch.float64).reshape(1, -1)
    if x1_scale is not None:
        out = out * x1_scale.to(torch.float64).reshape(-1, 1)
    return out.to(output_dtype or torch.bfloat16)


def _mm_reduce_scatter(self, x2, hcom, world_size, *, reduce_op="sum", bias=None, x1_scale=None, x2_scale=None,
                       comm_turn=0, output_dtype=None, comm_mode=None):
    import torch.distributed as dist

    full = _scaled(self, x2, bias, x1_scale, x2_scale, output_dtype).contiguous()
    out = full.new_empty((full.shape[0] // world_size, full.shape[1]))
    dist.reduce_scatter_tensor(out, full, group=_pg(hcom))
    return out


def _mm_reduce_scatter_fake(self, x2, hcom, world_size, *, reduce_op="sum", bias=None, x1_scale=None,
                            x2_scale=None, comm_turn=0, output_dtype=None, comm_mode=None):
    dt = self.dtype if x2_scale is None else (output_dtype or torch.bfloat16)
    return self.new_empty((self.shape[0] // world_size, x2.shape[1]), dtype=dt)


def _all_gather_mm(self, x2, hcom, world_size, *, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                   gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    import torch.distributed as dist

    x = self.contiguous()
    g = x.new_empty((x.shape[0] * world_size, x.shape[1]))
    dist.all_gather_into_tensor(g, x, group=_pg(hcom))
    return _scaled(g, x2, bias, None, x2_scale, output_dtype), g


def _all_gather_mm_fake(self, x2, hcom, world_size, *, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                        gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    rows = self.shape[0] * world_size
    dt = self.dtype if x2_scale is None else (output_dtype or torch.bfloat16)
    return self.new_empty((rows, x2.shape[1]), dtype=dt), self.new_empty((rows, self.shape[1]))


KERNELS = {"npu::npu_mm_all_reduce_base": (_mm_all_reduce, _mm_all_reduce_fake),
           "npu::npu_mm_reduce_scatter_base": (_mm_reduce_scatter, _mm_reduce_scatter_fake),
           "npu::npu_all_gather_base_mm": (_all_gather_mm, _all_gather_mm_fake)}
_LIBS: dict[str, torch.library.Library] = {}
_DEFINED: list[str] = []


def ensure_fused_standin_ops() -> list[str]:
    """Define the three fused-kernel stand-ins where this process lacks them (idempotent)."""
    from fxpasses.testing.npu_standin import define_standins

    return define_standins(SCHEMAS, KERNELS, _LIBS, _DEFINED)


def register_standin_hcom(ctx, hcom: str = "hcom_standin_tp") -> str:
    """Name the TP group's communicator `hcom` for the lowering and for the stand-in kernels."""
    from fxpasses.lowering import groups

    groups.register_hcom_name((ctx.tp_group.c10d_name, ctx.tp_group.vllm_name), hcom)
    HCOM_GROUPS[hcom] = ctx.tp_group.c10d_name
    return hcom


# ---- rank functions ------------------------------------------------------------------------------------

def _describe(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"node": v.name, "op": _op(v)}
    if isinstance(v, (list, tuple)):
        return [_describe(x) for x in v]
    if isinstance(v, torch.dtype):
        return str(v)
    return v


def _op(n: fx.Node) -> str:
    from fxpasses import graph_forms as gf

    return gf.op_name(n) if n.op == "call_function" else n.op


def rank_lower(state: dict, key: str, backend: str, tokens: list[int] | None = None,
               register: bool = True, weight_format: str = "nd") -> dict:
    """Lower a copy of the captured (rewritten, unfused) graph of `key` with `backend` ("npu", "cuda",
    "reference"), registering what the backend needs about the TP group first (stand-in hcom name /
    symmetric memory flag; `register=False` leaves the group as it is; `weight_format` as the
    configuration's, plain weights by default). Returns the lowering record, every emitted fused node (op, args, kwargs
    described) and, with `tokens`, the max relative error of the lowered graph against the captured
    one per token count (the npu stand-ins have CPU kernels; the cuda form is structure only)."""
    from fxpasses.context import TPContext
    from fxpasses.graph_copy import copy_graph
    from fxpasses.lowering import groups
    from fxpasses.lowering.lower import lower_graph
    from fxpasses.lowering.match import FUSED_COLLECTIVES
    from fxpasses.commands.tp_run.harness import graph_args

    ctx = TPContext.from_vllm()
    import logging
    import os

    if os.environ.get("FXPASSES_LOWER_DEBUG"):
        logging.getLogger("fxpasses").setLevel(logging.DEBUG)
    if backend == "npu":
        ensure_fused_standin_ops()
        if register:
            register_standin_hcom(ctx)
    elif backend == "cuda" and register:
        groups.register_symm_mem_group((ctx.tp_group.c10d_name, ctx.tp_group.vllm_name))
    entry = state["captures"][key]
    src = entry["cap"].graphs[0]
    gm = fx.GraphModule(src, copy_graph(src.graph, None))
    rec = lower_graph(gm.graph, "auto", ctx, backend=backend, weight_format=weight_format)
    gm.recompile()
    emitted = [{"op": _op(n), "args": _describe(list(n.args)), "kwargs": _describe(dict(n.kwargs)),
                "tag": n.meta.get("fxpasses")} for n in gm.graph.nodes if _op(n) in FUSED_COLLECTIVES]
    extra = [_op(n) for n in gm.graph.nodes if _op(n) == "fxpasses::rank0_bias"]
    out = {"record": rec, "emitted": emitted, "rank0_bias": len(extra), "rank": ctx.rank}
    if tokens:
        errs = []
        with torch.no_grad():
            for T in tokens:
                cap, args = graph_args(state, key, T)
                ref = src(*list(args))[0].double()
                new = gm(*list(args))[0].double()
                scale = ref.abs().max().item() or 1.0
                errs.append({"T": T, "shape_ok": ref.shape == new.shape,
                             "rel": (new - ref).abs().max().item() / scale if ref.shape == new.shape else float("inf")})
        out["compare"] = errs
    from fxpasses import comm_volume

    sizes = {n: ctx.tp for n in (ctx.tp_group.c10d_name, ctx.tp_group.vllm_name, "hcom_standin_tp") if n}
    v0, v1, _ = comm_volume.step_bytes_pair(src.graph, gm.graph, sizes, ctx.tp)
    out["bytes"] = {"unfused": v0["total"], "fused": v1["total"]}
    import json

    return json.loads(json.dumps(out, default=repr))  # plain data across the pool's pipe
