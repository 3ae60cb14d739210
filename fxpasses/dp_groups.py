"""Process groups for the DP-attention strategies: o_proj tensor parallel (OTP) and MLP-TP.

In a DP-attention deployment every rank runs attention on its own tokens with TP=1 (full weights),
and selected linears are split across a group of K ranks:

* OTP group: consecutive blocks of K ranks, {jK, ..., jK + K-1} (vllm-ascend's `_OTP`);
* MLP-TP group: K ranks, consecutive blocks by default (the seed's `_MLP_TP` layout), or strided
  {i, i + world/K, ...} with `layout="strided"`.

K must divide the world size (`otp_size` / `mlp_tp_size`, 0 = the world size). The groups of the
whole world are created once per process, on every rank, in one fixed order (OTP first, then MLP-TP,
as `ensure_dp_groups` does), because `torch.distributed.new_group` is collective over the default
group; the result is cached per (kind, world, K, layout).
"""
from __future__ import annotations

from dataclasses import dataclass

from fxpasses.context import GroupRef, TPContext
from fxpasses.errors import ConfigError

LAYOUTS = ("consecutive", "strided")


def check_dp_size(world: int, k: int, key: str = "k") -> int:
    """K itself, or ConfigError when K < 2 or K does not divide the world size."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or world % k:
        raise ConfigError(f"{key}={k} must be >= 2 and divide the world size {world}; "
                          f"valid values: {[d for d in range(2, world + 1) if world % d == 0]}")
    return k


def dp_group_ranks(world: int, k: int, layout: str = "consecutive") -> list[list[int]]:
    """All groups of size K in the world, in creation order."""
    check_dp_size(world, k)
    if layout not in LAYOUTS:
        raise ConfigError(f"group layout {layout!r} unknown; choose from {LAYOUTS}")
    if layout == "consecutive":
        return [list(range(j * k, (j + 1) * k)) for j in range(world // k)]
    n = world // k
    return [[i + j * n for j in range(k)] for i in range(n)]


@dataclass(frozen=True)
class DPGroup:
    kind: str            # "otp" | "mlp_tp"
    k: int
    ref: GroupRef        # this rank's group (label = kind)
    rank: int            # this rank's index in the group (= the weight shard it computes)


_CACHE: dict[tuple, DPGroup] = {}


def _create(rank_lists: list[list[int]], desc: str, me: int) -> str:
    """new_group for every list (same order on all ranks); the c10d name of the one holding `me`."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mine = None
    with unset_fake_temporarily():  # the pass runs inside the compiler's fake mode
        for i, ranks in enumerate(rank_lists):
            pg = dist.new_group(ranks, group_desc=f"fxpasses_{desc}_{i}")
            if me in ranks:
                mine = pg.group_name
    assert mine is not None
    return mine


def dp_group(ctx: TPContext, kind: str, k: int, layout: str = "consecutive") -> DPGroup:
    """This rank's OTP / MLP-TP group, creating the world's groups of that kind on first use.
    Collective over the default group the first time: every rank must call it in the same order."""
    world, me = ctx.world, ctx.global_rank
    k = k or world
    check_dp_size(world, k, f"{kind}_size")
    key = (kind, world, k, layout)
    if key in _CACHE:
        return _CACHE[key]
    lists = dp_group_ranks(world, k, layout)
    ranks = next(g for g in lists if me in g)
    if k == world:
        import torch.distributed as dist
        name = dist.group.WORLD.group_name  # the whole world: reuse the default group
    else:
        name = _create(lists, kind, me)
    res = DPGroup(kind, k, GroupRef(tuple(ranks), name, None, kind), ranks.index(me))
    _CACHE[key] = res
    return res


def ensure_dp_groups(ctx: TPContext, config) -> dict[str, DPGroup]:
    """The groups every enabled DP strategy needs, created in the fixed order OTP, MLP-TP."""
    out = {}
    if "otp" in config.strategies:
        out["otp"] = dp_group(ctx, "otp", config.otp_size)
    if "mlp_tp" in config.strategies:
        out["mlp_tp"] = dp_group(ctx, "mlp_tp", config.mlp_tp_size)
    return out
