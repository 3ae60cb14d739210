"""Decide which strategy owns which site: pattern sets + configuration + the seed's precedence.

Row site:    MLP-TP (down_proj) > OTP (o_proj) > FlashComm2 (o_proj/out_proj) > FlashComm1.
Column site: MLP-TP (gate_up_proj) > FlashComm1.
Embedding:   FlashComm1.
Global exclusions (vision towers, MTP blocks...) and per-strategy exclusions (shared_expert)
win over everything. Every site gets a SitePlan with the owning strategy or the reason it has none.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxpasses.config import FxPassesConfig
from fxpasses.patterns_loader import PatternSet
from fxpasses.sites import Site

ROW_PRECEDENCE = ("mlp_tp", "otp", "flashcomm2", "flashcomm1")
COLUMN_PRECEDENCE = ("mlp_tp", "flashcomm1")
EMBEDDING_PRECEDENCE = ("flashcomm1",)
PRECEDENCE = {"row": ROW_PRECEDENCE, "column": COLUMN_PRECEDENCE, "embedding": EMBEDDING_PRECEDENCE,
              "replicated": ()}


@dataclass
class SitePlan:
    site: Site
    strategy: str | None
    reason: str = ""
    status: str = "planned"    # planned -> rewritten | skipped ; "untouched" when no strategy owns it

    def to_dict(self) -> dict:
        return {**self.site.describe(), "strategy": self.strategy, "status": self.status, "reason": self.reason}


def plan_sites(sites: list[Site], config: FxPassesConfig, patterns: PatternSet) -> list[SitePlan]:
    plans = []
    enabled = set(config.strategies)
    for site in sites:
        ex = patterns.excluded(site.prefix)
        if ex:
            plans.append(SitePlan(site, None, f"excluded by pattern set (prefix contains {ex!r})", "untouched"))
            continue
        chosen, why_not = None, []
        for strat in PRECEDENCE[site.kind]:
            if strat not in enabled:
                continue
            sp = patterns.strategies.get(strat)
            if sp is None or not sp.matches(site.kind, site.prefix):
                continue
            ex = sp.excluded(site.prefix)
            if ex:
                why_not.append(f"{strat} excludes prefixes containing {ex!r}")
                continue
            chosen = strat
            break
        if chosen:
            plans.append(SitePlan(site, chosen))
        else:
            reason = "; ".join(why_not) or ("no enabled strategy matches this prefix" if enabled
                                            else "no strategy enabled")
            plans.append(SitePlan(site, None, reason, "untouched"))
    return plans
