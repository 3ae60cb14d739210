"""Worker start: every process group a configuration needs, created on this rank before anything
is compiled - each enabled strategy's groups beyond TP (`fxpasses.topology`: FlashComm2's ODP/OTP,
the OTP and MLP-TP groups) and what the lowering's platform kernels need about them
(`fxpasses.lowering.groups`: HCCL names on NPU, symmetric memory on CUDA).

The vLLM plugin calls `prepare_process_groups` right after vLLM's own groups exist, the test
harness before capturing; inside a compilation the strategies and the lowering only look up what
was prepared here. It sits above `topology`, `lowering` and the strategy registry, which never
import it.
"""
from __future__ import annotations

from fxpasses import topology
from fxpasses.context import TPContext
from fxpasses.lowering import groups as lowering_groups
from fxpasses.strategies import registry


def fusable_groups(ctx: TPContext) -> list[tuple[str, str | None]]:
    """(c10d name, vLLM name) of every group a rewritten graph may fuse over: TP, and the groups the
    enabled strategies created (FlashComm2's ODP/OTP)."""
    out = []
    if ctx.tp_group is not None:
        out.append((ctx.tp_group.c10d_name, ctx.tp_group.vllm_name))
    for g in topology.cached_flashcomm2_groups().values():
        for ref in (g.odp, g.otp):
            if ref is not None and (ref.c10d_name, ref.vllm_name) not in out:
                out.append((ref.c10d_name, ref.vllm_name))
    return out


def prepare_process_groups(config, ctx: TPContext) -> None:
    """Create every process group `config` will need on this rank, now, outside any compilation:
    each enabled strategy's `prepare_groups`, in canonical strategy order (the same on every rank),
    then the lowering's records of them.

    The passes would otherwise create them lazily on first use, which is correct when every rank
    compiles the same graphs in the same order (vLLM's workers do), but puts a collective
    (`new_group`) inside the compiler. Callers that can, call this first on every rank."""
    for name in config.strategies:
        registry.get(name).prepare_groups(config, ctx, create=True)
    lowering_groups.prepare(config, ctx, fusable_groups(ctx))
