"""What a pass run did, in a form people and tests read: per-site records, collective counts
before/after, the op-count diff line (`all_reduce: 9 -> 0, reduce_scatter: 0 -> 9, ...`)."""
from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses.lowering.lower import text_lines
from fxpasses.site_records import SiteStatus

KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")


def collective_counts(graph: fx.Graph) -> dict[str, int]:
    c = Counter(gf.collective_kind(n) for n in graph.nodes)
    return {k: c.get(k, 0) for k in KINDS}


def diff_line(before: dict[str, int], after: dict[str, int]) -> str:
    return ", ".join(f"{k}: {before[k]} -> {after[k]}" for k in KINDS if before[k] or after[k])


@dataclass
class PassReport:
    rank: int
    tp: int
    strategies: list[str]
    applied: bool = False
    reason: str = ""
    sites: list = field(default_factory=list)            # SitePlan
    global_rank: int | None = None                       # rank in the world (dump folders); None: = rank
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    fingerprint: list = field(default_factory=list)
    digest: str = ""
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def world_rank(self) -> int:
        return self.rank if self.global_rank is None else self.global_rank

    @contextmanager
    def timed(self, step: str):
        """Time a step of the pass into extra["timings_ms"][step] (also when it returns early)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.extra.setdefault("timings_ms", {})[step] = round((time.perf_counter() - t) * 1e3, 3)

    def record_applied(self, rewriter, verification, after: dict, nodes: int) -> None:
        """The rewrite was committed: take the rewriter's notes and numbers and the verification's
        fingerprint."""
        self.applied = True
        self.after = after
        self.notes.extend(rewriter.notes)
        self.extra.update(rewriter.extra)
        self.extra["nodes"] = nodes
        self.extra["token_layout"] = rewriter.token_layout()
        self.extra["nodes_repropagated"] = verification.nodes_propagated
        self.fingerprint, self.digest = verification.fingerprint, verification.digest

    @property
    def diff(self) -> str:
        return diff_line(self.before, self.after) if self.before else ""

    def rewritten(self, strategy: str | None = None) -> list[str]:
        return [p.site.prefix for p in self.sites if p.status is SiteStatus.REWRITTEN
                and (strategy is None or p.strategy == strategy)]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "global_rank": self.world_rank, "tp": self.tp, "strategies": self.strategies, "applied": self.applied,
                "reason": self.reason, "collectives_before": self.before, "collectives_after": self.after,
                "diff": self.diff, "fingerprint": self.fingerprint, "fingerprint_digest": self.digest,
                "notes": self.notes, **self.extra, "sites": [p.to_dict() for p in self.sites]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def to_text(self) -> str:
        lines = [f"fxpasses rank {self.rank}/tp {self.tp} strategies={'+'.join(self.strategies) or '-'} "
                 f"applied={self.applied}" + (f" ({self.reason})" if self.reason else "")]
        if self.diff:
            lines.append(f"  collectives: {self.diff}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        w = max([len(p.site.prefix) for p in self.sites] + [10])
        for p in self.sites:
            lines.append(f"  {p.site.prefix:<{w}} {p.site.layer_class:<28} {str(p.strategy or '-'):<11} "
                         f"{p.status:<9} {p.reason}")
        lines.extend(text_lines(self.extra.get("lowering")))  # fused kernels per pair, or why not
        return "\n".join(lines)
