"""Decide which strategy owns which site: pattern sets + configuration + strategy precedence.

For each site, the enabled strategies that own its kind are tried from the highest precedence down
(`fxpasses.strategies.registry.by_precedence`; with the built-in strategies: row site MLP-TP > OTP >
FlashComm2 > FlashComm1, column site MLP-TP > FlashComm1, embedding and reduce sites FlashComm1);
the first whose pattern table matches the prefix owns the site, the others that match are its
fallbacks: when the owner's precheck refuses the site for a reason of its own (FlashComm2: packed
weight), the next one takes it (`SitePlan.hand_over`), so a combination is never worse than its parts. Global exclusions (vision towers, MTP blocks...) and
per-strategy exclusions (shared_expert) win over everything. Every site gets a SitePlan with the
owning strategy or the reason it has none.
"""
from __future__ import annotations

from fxpasses.config import FxPassesConfig
from fxpasses.patterns_loader import PatternSet
from fxpasses.site_records import Site, SitePlan, SiteStatus
from fxpasses.strategies.registry import by_precedence


def plan_sites(sites: list[Site], config: FxPassesConfig, patterns: PatternSet,
               left_out: dict[str, str] | None = None) -> list[SitePlan]:
    """One plan per site. `left_out`: enabled strategies the pipeline dropped for this graph, with
    why (a site they would own says so, never "no enabled strategy matches")."""
    plans = []
    left_out = left_out or {}
    enabled = set(config.strategies) | set(left_out)
    for site in sites:
        ex = patterns.excluded(site.prefix)
        if ex:
            plans.append(SitePlan(site, None, f"excluded by pattern set (prefix contains {ex!r})",
                                  SiteStatus.UNTOUCHED))
            continue
        wanting, why_not = [], []
        able = by_precedence(site.kind, enabled)
        for strat in able:
            sp = patterns.for_strategy(strat)
            if not sp.matches(site.kind, site.prefix):
                pats = getattr(sp, site.kind, [])
                why_not.append(f"{strat.name} owns {site.kind} sites whose prefix contains one of "
                               f"{pats} (pattern set), not this one")
                continue
            ex = sp.excluded(site.prefix)
            if ex:
                why_not.append(f"{strat.name} excludes prefixes containing {ex!r}")
                continue
            if strat.name in left_out:
                why_not.append(f"{strat.name} was left out of this graph: {left_out[strat.name]}")
                continue
            wanting.append(strat.name)
        if wanting:
            plans.append(SitePlan(site, wanting[0], fallbacks=wanting[1:]))
        else:
            reason = "; ".join(why_not) or (
                f"no enabled strategy ({'+'.join(sorted(enabled))}) rewrites {site.kind} sites"
                + (" (a replicated layer: no TP communication to rewrite)" if site.kind == "replicated" else "")
                if enabled else "no strategy enabled")
            plans.append(SitePlan(site, None, reason, SiteStatus.UNTOUCHED))
    return plans
