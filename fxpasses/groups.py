"""Process-group topology for the strategies that need groups beyond TP (FlashComm2's ODP/OTP).

Pure functions give the rank lists; `flashcomm2_groups(ctx, k)` creates the torch.distributed groups
once per process and returns this rank's `GroupRef`s.

FlashComm2 with tp ranks per TP block and o_proj TP size K (1 <= K < tp, K | tp), n = tp / K:

* ODP ("o_proj data parallel") = contiguous blocks of n ranks of a TP block: {b + j*n, ..., b + j*n + n-1}
* OTP ("o_proj tensor parallel") = strided groups {b + i, b + i + n, ..., b + i + (K-1)*n}

where b is the first global rank of the TP block. Every TP block of the world (data-parallel and
pipeline replicas: vLLM lays ranks out as [..., dp, pp, tp], TP innermost) gets its own groups. For
K = 1 ODP is the TP group itself and there is no OTP group. The lists, and their order, are exactly
those vllm-ascend's `init_ascend_model_parallel` builds (`_FLASHCOMM2_OTP`, `_FLASHCOMM2_ODP`).
"""
from __future__ import annotations

from dataclasses import dataclass

from fxpasses.context import GroupRef, TPContext
from fxpasses.errors import ConfigError, RewriteError


def check_flashcomm2_sizes(tp: int, k: int) -> int:
    """n = tp / K, or ConfigError when K is not a proper divisor of tp."""
    if not (isinstance(k, int) and isinstance(tp, int)) or k < 1 or tp < 2 or k >= tp or tp % k:
        raise ConfigError(f"flashcomm2_oproj_tp_size={k} must divide tp={tp} and be smaller than it; "
                          f"valid values: {[d for d in range(1, tp) if tp > 1 and tp % d == 0]}")
    return tp // k


def flashcomm2_odp_ranks(tp: int, k: int, world: int | None = None) -> list[list[int]]:
    """All ODP groups of the world, in vllm-ascend's order (TP block by TP block, then j).
    K = 1: the TP groups."""
    n = check_flashcomm2_sizes(tp, k)
    world = world or tp
    if world % tp:
        raise ConfigError(f"world size {world} is not a multiple of tp={tp}")
    return [[blk * tp + j * n + i for i in range(n)] for blk in range(world // tp) for j in range(k)]


def flashcomm2_otp_ranks(tp: int, k: int, world: int | None = None) -> list[list[int]]:
    """All OTP groups of the world, in vllm-ascend's order (TP block by TP block, then i).
    K = 1: no OTP group (empty list)."""
    n = check_flashcomm2_sizes(tp, k)
    world = world or tp
    if world % tp:
        raise ConfigError(f"world size {world} is not a multiple of tp={tp}")
    if k == 1:
        return []
    return [[blk * tp + i + j * n for j in range(k)] for blk in range(world // tp) for i in range(n)]


def flashcomm2_reorder_ids(tp: int, k: int) -> list[list[int]]:
    """vllm-ascend's `get_flashcomm2_reorgnized_batch_ids`: chunk ids [[i + j*n for j] for i]."""
    n = check_flashcomm2_sizes(tp, k)
    return [[i + j * n for j in range(k)] for i in range(n)]


def group_containing(groups: list[list[int]], rank: int) -> list[int] | None:
    return next((g for g in groups if rank in g), None)


@dataclass(frozen=True)
class FlashComm2Groups:
    tp: int
    k: int
    n: int
    odp: GroupRef              # this rank's ODP group (K=1: the TP group)
    otp: GroupRef | None       # this rank's OTP group (None when K=1)
    odp_rank: int              # r mod n
    shard: int                 # s = r div n: which D/K column block of o_proj this rank computes


_CACHE: dict[tuple, FlashComm2Groups] = {}


def _new_groups(rank_lists: list[list[int]], desc: str, backend) -> dict[tuple[int, ...], str]:
    """Create every group in `rank_lists` (all ranks call new_group for all groups, same order);
    return {ranks: c10d group name} for the groups this rank belongs to."""
    import torch.distributed as dist

    mine = {}
    for i, ranks in enumerate(rank_lists):
        pg = dist.new_group(ranks, backend=backend, group_desc=f"fxpasses_{desc}_{i}")
        if dist.get_rank() in ranks:
            mine[tuple(ranks)] = pg.group_name
    return mine


def flashcomm2_groups(ctx: TPContext, k: int) -> FlashComm2Groups:
    """This rank's ODP/OTP groups, creating the process groups of the whole world on first use.

    Must be called by every rank of the world (torch.distributed.new_group is collective over the
    default group), in the same order; the result is cached per (tp, K, world) for the process."""
    if ctx.tp_group is None:
        raise RewriteError("FlashComm2 needs a TP group (tp >= 2)")
    n = check_flashcomm2_sizes(ctx.tp, k)
    key = (ctx.tp, k, ctx.world, ctx.tp_group.ranks)
    if key in _CACHE:
        return _CACHE[key]
    tp_ranks = list(ctx.tp_group.ranks)
    r = ctx.rank
    blk = tp_ranks[0] // ctx.tp
    if tp_ranks != list(range(blk * ctx.tp, (blk + 1) * ctx.tp)) or ctx.world % ctx.tp:
        raise RewriteError(f"FlashComm2 expects TP groups to be contiguous rank blocks (vLLM's layout); "
                           f"this rank's TP group is {tp_ranks} in a world of {ctx.world}")
    odp_lists = flashcomm2_odp_ranks(ctx.tp, k, ctx.world)
    otp_lists = flashcomm2_otp_ranks(ctx.tp, k, ctx.world)
    odp_mine = group_containing(odp_lists, ctx.global_rank)
    otp_mine = group_containing(otp_lists, ctx.global_rank) if k > 1 else None
    if k == 1:
        odp = GroupRef(ctx.tp_group.ranks, ctx.tp_group.c10d_name, ctx.tp_group.vllm_name, "odp")
        otp = None
    else:
        import torch.distributed as dist
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        backend = None
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group
            backend = dist.get_backend(_resolve_process_group(ctx.tp_group.c10d_name))
        except Exception:
            backend = None
        with unset_fake_temporarily():
            # vllm-ascend's order: OTP groups first, then ODP groups
            otp_names = _new_groups(otp_lists, "flashcomm2_otp", backend)
            odp_names = _new_groups(odp_lists, "flashcomm2_odp", backend)
        odp = GroupRef(tuple(odp_mine), odp_names[tuple(odp_mine)], None, "odp")
        otp = GroupRef(tuple(otp_mine), otp_names[tuple(otp_mine)], None, "otp")
    res = FlashComm2Groups(ctx.tp, k, n, odp, otp, r % n, r // n)
    _CACHE[key] = res
    return res


def prepare_process_groups(config, ctx: TPContext) -> None:
    """Create every process group `config` will need on this rank (FlashComm2's ODP/OTP for K > 1,
    OTP / MLP-TP groups), now, outside any compilation.

    The passes create them lazily on first use, which is correct when every rank compiles the same
    graphs in the same order (vLLM's workers do), but it puts a collective (`new_group`) inside the
    compiler. Callers that can, call this first on every rank: the harness does before capturing."""
    from fxpasses import dp_groups

    if "flashcomm2" in config.strategies and config.flashcomm2_oproj_tp_size > 1 and ctx.tp >= 2:
        flashcomm2_groups(ctx, config.flashcomm2_oproj_tp_size)
    if ctx.world >= 2:
        dp_groups.ensure_dp_groups(ctx, config)  # creates only what otp / mlp_tp in the config need
