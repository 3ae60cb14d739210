"""The records of one site: `Site` (what site finding saw of one layer or stray all-reduce) and
`SitePlan` with its `SiteStatus` (which strategy owns it, and what became of it).

`SITE_KINDS` names the kinds a site can have; `TP_SHARDED_KINDS` those whose weights vLLM shards
over the TP group. Data only: site finding (`fxpasses.sites`) fills Sites, planning
(`fxpasses.plan`) makes the plans, strategies and the pipeline move their status.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch.fx as fx

from fxpasses import graph_forms as gf

# "reduce": an all-reduce outside any layer (the end of an MoE block or a parallel-residual layer)
SITE_KINDS = ("row", "column", "embedding", "replicated", "moe", "reduce")
# kinds whose weights vLLM shards over the TP group: their outputs are rank-local (feature shards or
# partial sums) until an all-reduce, whatever strategy owns them (see `fxpasses.rewriter`)
TP_SHARDED_KINDS = ("row", "column", "embedding", "moe")



@dataclass
class Site:
    prefix: str                         # vLLM layer prefix, e.g. "model.layers.0.self_attn.o_proj"
    layer_class: str
    kind: str                           # row | column | embedding | replicated | moe | reduce
    nodes: list[fx.Node] = field(default_factory=list)
    matmul: fx.Node | None = None       # mm/addmm/linear/onednn_mm (auto_functionalized), a platform
                                        # matmul (fxpasses.op_forms) or embedding
    input: fx.Node | None = None        # activation entering the layer
    weight: fx.Node | None = None       # visible weight (placeholder) or None when packed/hidden
    bias: fx.Node | None = None
    all_reduce: gf.AllReduce | None = None

    @property
    def weight_visible(self) -> bool:
        return self.weight is not None

    def describe(self) -> dict:
        return {"prefix": self.prefix, "class": self.layer_class, "kind": self.kind,
                "matmul": self.matmul.name if self.matmul is not None else None,
                "all_reduce": (self.all_reduce.form if self.all_reduce else None)}


class SiteStatus(StrEnum):
    PLANNED = "planned"        # owned by a strategy, not rewritten yet
    REWRITTEN = "rewritten"
    SKIPPED = "skipped"        # owned, but the strategy (or the pipeline) could not rewrite it
    UNTOUCHED = "untouched"    # no enabled strategy owns it


@dataclass
class SitePlan:
    site: Site
    strategy: str | None
    reason: str = ""
    status: SiteStatus = SiteStatus.PLANNED
    fallbacks: list[str] = field(default_factory=list)  # next strategies that want it, in order

    def hand_over(self, why: str) -> bool:
        """The owner cannot rewrite this site for a reason of its own (`why`): the next strategy that
        wants it takes it. False when there is none (the caller skips it)."""
        if not self.fallbacks:
            return False
        prev, self.strategy = self.strategy, self.fallbacks.pop(0)
        self.reason = f"{prev} skipped it: {why}; "
        return True

    def skip(self, reason: str) -> None:
        self.status, self.reason = SiteStatus.SKIPPED, reason

    def leave(self, reason: str) -> None:
        """Nothing of this site's own needs rewriting (e.g. its partial sum is reduced elsewhere)."""
        self.status, self.reason = SiteStatus.UNTOUCHED, reason

    def done(self, how: str) -> None:
        self.status, self.reason = SiteStatus.REWRITTEN, (self.reason if self.strategy and
                                                          self.reason.endswith("; ") else "") + how

    def to_dict(self) -> dict:
        return {**self.site.describe(), "strategy": self.strategy, "status": str(self.status),
                "reason": self.reason}
