"""Decide which strategy owns which site: pattern sets + configuration + strategy precedence.

For each site, the enabled strategies that own its kind are tried from the highest precedence down
(`fxpasses.strategies.base.by_precedence`; with the built-in strategies: row site MLP-TP > OTP >
FlashComm2 > FlashComm1, column site MLP-TP > FlashComm1, embedding FlashComm1); the first whose
pattern table matches the prefix owns the site. Global exclusions (vision towers, MTP blocks...) and
per-strategy exclusions (shared_expert) win over everything. Every site gets a SitePlan with the
owning strategy or the reason it has none.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from fxpasses.patterns_loader import PatternSet
from fxpasses.sites import Site
from fxpasses.strategies.base import by_precedence

if TYPE_CHECKING:  # pragma: no cover - types only
    from fxpasses.config import FxPassesConfig


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

    def skip(self, reason: str) -> None:
        self.status, self.reason = SiteStatus.SKIPPED, reason

    def done(self, how: str) -> None:
        self.status, self.reason = SiteStatus.REWRITTEN, how

    def to_dict(self) -> dict:
        return {**self.site.describe(), "strategy": self.strategy, "status": str(self.status),
                "reason": self.reason}


def plan_sites(sites: list[Site], config: "FxPassesConfig", patterns: PatternSet) -> list[SitePlan]:
    plans = []
    enabled = set(config.strategies)
    for site in sites:
        ex = patterns.excluded(site.prefix)
        if ex:
            plans.append(SitePlan(site, None, f"excluded by pattern set (prefix contains {ex!r})",
                                  SiteStatus.UNTOUCHED))
            continue
        chosen, why_not = None, []
        for strat in by_precedence(site.kind, enabled):
            sp = patterns.for_strategy(strat)
            if not sp.matches(site.kind, site.prefix):
                continue
            ex = sp.excluded(site.prefix)
            if ex:
                why_not.append(f"{strat.name} excludes prefixes containing {ex!r}")
                continue
            chosen = strat.name
            break
        if chosen:
            plans.append(SitePlan(site, chosen))
        else:
            reason = "; ".join(why_not) or ("no enabled strategy matches this prefix" if enabled
                                            else "no strategy enabled")
            plans.append(SitePlan(site, None, reason, SiteStatus.UNTOUCHED))
    return plans
