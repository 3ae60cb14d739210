"""The layout vocabulary: how a value's token dimension (dim 0) is distributed over a group.

Layouts are DTensor placements: `Replicate()`, `Partial()`, `Shard(0)` (zero-padded to a
multiple of the group size, rank i holds rows [i*T_pad/n, (i+1)*T_pad/n)), `Shard(1)`. The
rewriter records a placement per value it changed; values it never touched keep their original
meaning (Replicate, or no token dimension at all).
"""
from __future__ import annotations

from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard

SHARD0: Placement = Shard(0)
SHARD1: Placement = Shard(1)
REPLICATE: Placement = Replicate()
PARTIAL: Placement = Partial()

# the collective that moves a value between two layouts (DESIGN.md "Layout model")
REDISTRIBUTE = {
    (PARTIAL, REPLICATE): "all_reduce",
    (PARTIAL, SHARD0): "pad + reduce_scatter",
    (SHARD0, REPLICATE): "all_gather + unpad",
    (SHARD0, SHARD1): "all_to_all",
    (SHARD1, SHARD0): "all_to_all",
    (REPLICATE, SHARD0): "pad + local slice (no communication)",
}


def name(p: Placement) -> str:
    return {SHARD0: "Shard0", SHARD1: "Shard1", REPLICATE: "Replicate", PARTIAL: "Partial"}.get(p, str(p))
