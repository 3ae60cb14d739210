"""The layout vocabulary: how a value's token dimension (dim 0) is distributed over a group.

Layouts are DTensor placements: `Replicate()` and `Shard(0)` (zero-padded to a multiple of the
group size, rank i holds rows [i*T_pad/n, (i+1)*T_pad/n)). The rewriter records a placement per
value it changed; values it never touched keep their original meaning (Replicate, or no token
dimension at all).
"""
from __future__ import annotations

from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

SHARD0: Placement = Shard(0)
REPLICATE: Placement = Replicate()
