"""Who this rank is in which groups: the distributed facts a rewrite depends on.

`TPContext.from_vllm()` reads vLLM's live groups; `TPContext.from_process_group()` uses a plain
torch.distributed group. Strategies that need further groups (FlashComm2's ODP/OTP, OTP, MLP-TP)
get them from `fxpasses.topology`, keyed by this context.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupRef:
    """A process group as the graph names it."""

    ranks: tuple[int, ...]          # global ranks, in group order
    c10d_name: str | None           # torch.distributed group name (functional collectives)
    vllm_name: str | None = None    # vLLM unique name ("tp:0") where a vLLM GroupCoordinator exists
    label: str = "tp"               # human name for dumps ("tp", "odp", "otp", ...)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def rank_of(self, global_rank: int) -> int:
        return self.ranks.index(global_rank)


@dataclass(frozen=True)
class TPContext:
    tp: int
    rank: int                  # rank in the TP group
    global_rank: int
    world: int
    tp_group: GroupRef | None  # None when tp == 1

    @classmethod
    def from_vllm(cls) -> "TPContext":
        from vllm.distributed.parallel_state import get_tp_group, get_world_group

        g = get_tp_group()
        world = get_world_group().world_size
        ref = None
        if g.world_size > 1:
            ref = GroupRef(tuple(g.ranks), g.device_group.group_name, g.unique_name, "tp")
        return cls(g.world_size, g.rank_in_group, get_world_group().rank, world, ref)

    @classmethod
    def from_process_group(cls, pg=None) -> "TPContext":
        import torch.distributed as dist

        pg = pg or dist.group.WORLD
        ranks = tuple(dist.get_process_group_ranks(pg))
        me = dist.get_rank()
        return cls(len(ranks), ranks.index(me), me, dist.get_world_size(),
                   GroupRef(ranks, pg.group_name, None, "tp") if len(ranks) > 1 else None)

    @classmethod
    def single(cls) -> "TPContext":
        return cls(1, 0, 0, 1, None)

    def key(self) -> str:
        return f"tp={self.tp},rank={self.rank},grank={self.global_rank},world={self.world}"
