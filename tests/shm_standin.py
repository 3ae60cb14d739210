"""A stand-in kernel for vLLM's `_C.shm_allreduce` (the CPU shared-memory all-reduce). On AVX2
machines vLLM's `_C` lacks the op, so it is registered here with the real schema and mutating
signature; where the op exists (AVX-512 builds) its CPU kernel is replaced in the test process,
because the gloo test pool has no shared-memory handle for the real kernel. Either way Dynamo/AOT
produce the real graph form (`auto_functionalized_v2(_C.shm_allreduce.default, handle=...,
_all_bases=[data])`) and the kernel is a gloo all-reduce over vLLM's TP group."""
import torch
import torch.nn.functional as F
from torch import nn


def _gloo_allreduce(handle: int, data: torch.Tensor) -> None:
    from vllm.distributed.parallel_state import get_tp_group
    torch.distributed.all_reduce(data, group=get_tp_group().device_group)


_LIBS: list = []


def ensure_standin_op() -> str:
    """Make `_C::shm_allreduce` run the gloo reference kernel in this process; returns "registered"
    (the build lacks the op: schema and kernel are ours) or "kernel" (the real schema, our kernel)."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C)
    if _LIBS:
        return _LIBS[0][0]
    if hasattr(torch.ops._C, "shm_allreduce"):
        lib = torch.library.Library("_C", "IMPL")  # noqa: TOR901 - replaces the real CPU kernel here only
        lib.impl("shm_allreduce", _gloo_allreduce, "CPU")
        _LIBS.append(("kernel", lib))
        return "kernel"
    torch.library.custom_op("_C::shm_allreduce", mutates_args=("data",))(_gloo_allreduce)
    _LIBS.append(("registered", None))
    return "registered"


class RowParallelLinear(nn.Module):
    """Named like vLLM's class so the default pattern set sees a row site; computes this rank's
    partial product of a seeded full weight, then the (stand-in) shm all-reduce."""

    def __init__(self, full: torch.Tensor, rank: int, tp: int):
        super().__init__()
        k = full.shape[1] // tp
        self.weight = nn.Parameter(full[:, rank * k:(rank + 1) * k].clone(), requires_grad=False)

    def forward(self, x):
        out = F.linear(x, self.weight)
        torch.ops._C.shm_allreduce(0, out)
        return out


class Block(nn.Module):
    def __init__(self, rank, tp, d=16, h=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.o_proj = RowParallelLinear(torch.randn(h, d, generator=g, dtype=torch.float64), rank, tp)
        self.scale = nn.Parameter(torch.randn(h, generator=g, dtype=torch.float64), requires_grad=False)
        self.d, self.tp = d, tp

    def forward(self, x):  # x: [T, d/tp] this rank's feature shard
        y = self.o_proj(x)
        return torch.tanh(y * self.scale) + y


def rank_run(state, tokens):
    from helpers import rank_block_flashcomm1

    standin = ensure_standin_op()
    tp, rank = state["world"], state["rank"]
    block = Block(rank, tp)
    own = slice(rank * (block.d // tp), (rank + 1) * (block.d // tp))   # this rank's feature shard

    def make_input(T, g):
        return torch.randn(T, block.d, generator=g, dtype=torch.float64)[:, own].contiguous()

    report, _, outs = rank_block_flashcomm1(block, "model.layers.0.self_attn", make_input, tokens)
    errs = [((new - ref).abs().max() / ref.abs().max()).item() for ref, new in outs]
    return {"standin": standin, "report": report.to_dict(), "errs": errs}
