"""Process-group topology: every group layout a strategy needs beyond TP, the one home of their
size validation, and their creation.

FlashComm2 (tp ranks per TP block, o_proj TP size K, 1 <= K < tp, K | tp, n = tp / K):

* ODP ("o_proj data parallel") = contiguous blocks of n ranks of a TP block: {b + j*n, ..., b + j*n + n-1}
* OTP ("o_proj tensor parallel") = strided groups {b + i, b + i + n, ..., b + i + (K-1)*n}

where b is the first global rank of the TP block. Every TP block of the world (data-parallel and
pipeline replicas: vLLM lays ranks out as [..., dp, pp, tp], TP innermost) gets its own groups. For
K = 1 ODP is the TP group itself and there is no OTP group. The lists, and their order, are exactly
those vllm-ascend's `init_ascend_model_parallel` builds (`_FLASHCOMM2_OTP`, `_FLASHCOMM2_ODP`).

DP attention (every rank runs attention on its own tokens with TP=1; selected linears are split
across K ranks, K | world, 0 = the world size):

* OTP group (`otp_size`): consecutive blocks of K ranks, {jK, ..., jK + K-1} (vllm-ascend's `_OTP`);
* MLP-TP group (`mlp_tp_size`): K consecutive ranks by default (the seed's `_MLP_TP` layout), or
  strided {i, i + world/K, ...} with `layout="strided"`.

Pure functions give the rank lists. Groups are created outside compilation, on every rank, by
`fxpasses.worker_groups.prepare_process_groups(config, ctx)` (the vLLM plugin calls it right after vLLM's own groups, at
worker start; the harness before capturing), with local synchronisation and names derived from
their rank lists, so a graph compiled by an earlier process finds them. Inside a compilation the
strategies only look them up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpasses.context import GroupRef, TPContext
from fxpasses.errors import ConfigError, RewriteError

LAYOUTS = ("consecutive", "strided")


# ---- sizes ----------------------------------------------------------------------------------------

def check_flashcomm2_sizes(tp: int, k: int) -> int:
    """n = tp / K, or ConfigError when K is not a proper divisor of tp."""
    if not (isinstance(k, int) and isinstance(tp, int)) or k < 1 or tp < 2 or k >= tp or tp % k:
        raise ConfigError(f"flashcomm2_oproj_tp_size={k} must divide tp={tp} and be smaller than it; "
                          f"valid values: {[d for d in range(1, tp) if tp > 1 and tp % d == 0]}")
    return tp // k


def check_dp_size(world: int, k: int, key: str = "k") -> int:
    """K itself, or ConfigError when K < 2 or K does not divide the world size."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or world % k:
        raise ConfigError(f"{key}={k} must be >= 2 and divide the world size {world}; "
                          f"valid values: {[d for d in range(2, world + 1) if world % d == 0]}")
    return k


# ---- rank lists -----------------------------------------------------------------------------------

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


def dp_group_ranks(world: int, k: int, layout: str = "consecutive") -> list[list[int]]:
    """All groups of size K in the world, in creation order."""
    check_dp_size(world, k)
    if layout not in LAYOUTS:
        raise ConfigError(f"group layout {layout!r} unknown; choose from {LAYOUTS}")
    if layout == "consecutive":
        return [list(range(j * k, (j + 1) * k)) for j in range(world // k)]
    n = world // k
    return [[i + j * n for j in range(k)] for i in range(n)]


# ---- this rank's groups ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FlashComm2Groups:
    tp: int
    k: int
    n: int
    odp: GroupRef              # this rank's ODP group (K=1: the TP group)
    otp: GroupRef | None       # this rank's OTP group (None when K=1)
    odp_rank: int              # r mod n
    shard: int                 # s = r div n: which D/K column block of o_proj this rank computes


@dataclass(frozen=True)
class DPGroup:
    kind: str            # "otp" | "mlp_tp"
    k: int
    ref: GroupRef        # this rank's group (label = kind)
    rank: int            # this rank's index in the group (= the weight shard it computes)


_FC2_CACHE: dict[tuple, FlashComm2Groups] = {}
_DP_CACHE: dict[tuple, DPGroup] = {}


_BY_RANKS: dict[tuple[int, ...], str] = {}


def group_name(ranks, desc: str, backend=None, create: bool = False) -> str:
    """The c10d name of the process group of exactly `ranks` (this rank is one of them).

    Groups are created with torch's local synchronisation (only their members take part) and
    registered under a name derived from their rank list alone, `fxpasses_<r0>_<r1>_...` (torch's
    own name depends on a creation counter): every process of every run names the same group alike,
    so a compiled graph from an earlier run resolves it. With `create=False` (inside a compilation)
    a missing group is an error naming the fix."""
    key = tuple(ranks)
    if key in _BY_RANKS:
        return _BY_RANKS[key]
    if not create:
        raise RewriteError(f"the {desc} process group {list(key)} does not exist; it is created outside "
                           "compilation: call fxpasses.worker_groups.prepare_process_groups(config, ctx) on every "
                           "rank before compiling (the vLLM plugin does it at worker start)")
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # create=True only comes from prepare_process_groups (worker start, harness and CLI before
    # capturing), never from a compilation: there a missing group raises above instead
    with unset_fake_temporarily():
        pg = dist.new_group(list(key), backend=backend, use_local_synchronization=True,
                            group_desc=f"fxpasses_{desc}")
    name = stable_group_name(key)
    torch._C._distributed_c10d._register_process_group(name, pg)  # resolvable by the stable name
    _BY_RANKS[key] = name
    return name


def stable_group_name(ranks) -> str:
    """The name fxpasses registers a group of these global ranks under."""
    return "fxpasses_" + "_".join(str(int(r)) for r in ranks)


def flashcomm2_groups(ctx: TPContext, k: int, create: bool = False) -> FlashComm2Groups:
    """This rank's ODP/OTP groups; `create=True` creates them first (collective over their members:
    every rank calls it, OTP before ODP). Cached per (tp, K, world, TP ranks) for the process."""
    if ctx.tp_group is None:
        raise RewriteError("FlashComm2 needs a TP group (tp >= 2)")
    n = check_flashcomm2_sizes(ctx.tp, k)
    key = (ctx.tp, k, ctx.world, ctx.tp_group.ranks)
    if key in _FC2_CACHE:
        return _FC2_CACHE[key]
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

        backend = None
        try:
            from torch.distributed.distributed_c10d import _resolve_process_group
            backend = dist.get_backend(_resolve_process_group(ctx.tp_group.c10d_name))
        except Exception:
            backend = None
        # vllm-ascend's order: OTP group first, then ODP group
        otp = GroupRef(tuple(otp_mine), group_name(otp_mine, "flashcomm2_otp", backend, create), None, "otp")
        odp = GroupRef(tuple(odp_mine), group_name(odp_mine, "flashcomm2_odp", backend, create), None, "odp")
    res = FlashComm2Groups(ctx.tp, k, n, odp, otp, r % n, r // n)
    _FC2_CACHE[key] = res
    return res


def dp_group(ctx: TPContext, kind: str, k: int, layout: str = "consecutive", create: bool = False) -> DPGroup:
    """This rank's OTP / MLP-TP group; `create=True` creates it first (collective over its members)."""
    world, me = ctx.world, ctx.global_rank
    k = k or world
    check_dp_size(world, k, f"{kind}_size")
    key = (kind, world, k, layout)
    if key in _DP_CACHE:
        return _DP_CACHE[key]
    lists = dp_group_ranks(world, k, layout)
    ranks = next(g for g in lists if me in g)
    if k == world:
        import torch.distributed as dist
        name = dist.group.WORLD.group_name  # the whole world: reuse the default group
    else:
        name = group_name(ranks, kind, None, create)
    res = DPGroup(kind, k, GroupRef(tuple(ranks), name, None, kind), ranks.index(me))
    _DP_CACHE[key] = res
    return res


def cached_flashcomm2_groups() -> dict[tuple, FlashComm2Groups]:
    """The FlashComm2 groups this process created, by (tp, K, world, TP ranks)."""
    return dict(_FC2_CACHE)
