"""The α-β constants of the live TP group, measured at worker start (`calibrate`).

Before anything is compiled (the vLLM plugin calls it right after vLLM has created its groups, in
every worker), each rank times the collectives the time model weighs, on the groups the graphs use:
the model's all-reduce through vLLM's TP group, and the reduce-scatter, all-gather and all-to-all a
rewrite inserts (vLLM's ops on the same group; all-to-all on its device group, as functional
collectives run). Each kind is timed at two message sizes (the fastest of a few calls after a
warm-up: other work on the machine only ever adds time);
the fixed cost and the bandwidth follow from the two points (send bytes counted as
`fxpasses.comm_volume` counts them).

Every rank must decide alike, and a compile-cache hit must not change a decision another rank took:
the measured values are reduced to their maximum over the group (one all-reduce, here, at worker
start: never inside a compilation), then rounded to two significant digits and handed to
`fxpasses.link_costs.set_calibrated`: `resolve` starts from them where the config lets it
(`link_costs: {"calibrate": false}` keeps the platform's fixed constants), and the vLLM pass puts
them in its cache key.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from fxpasses import link_costs
from fxpasses.link_costs import KINDS, PLATFORMS, Link, LinkCosts

log = logging.getLogger("fxpasses")

#: float32 elements per message (per rank's contribution): a small and a large point of the line
SIZES = (1024, 64 * 1024)
REPEATS = 7


def round_sig(x: float, digits: int = 2) -> float:
    """`x` to `digits` significant digits (0 stays 0)."""
    if x <= 0 or not math.isfinite(x):
        return 0.0 if x <= 0 else x
    return round(x, digits - 1 - int(math.floor(math.log10(x))))


def send_bytes(kind: str, elems: int, n: int) -> float:
    """Per-rank send bytes of one collective whose per-rank tensor has `elems` float32 elements (ring
    accounting, as `fxpasses.comm_volume`: an all-reduce sends 2(n-1)/n of it; a reduce-scatter,
    all-gather and all-to-all (n-1)/n of the full [n x elems] tensor)."""
    size = 4 * elems
    return 2 * (n - 1) / n * size if kind == "all_reduce" else (n - 1) * size


def fit(points: list[tuple[float, float]]) -> Link:
    """Link(latency_us, gbps) through two (send bytes, µs) points; a flat or falling line has no
    measurable bandwidth cost (a very large gbps) and its latency is the larger time."""
    (b0, t0), (b1, t1) = sorted(points)
    if t1 <= t0 or b1 <= b0:
        return Link(max(t0, t1), 1e6)
    per_byte_us = (t1 - t0) / (b1 - b0)
    return Link(max(0.0, t0 - b0 * per_byte_us), 1e-3 / per_byte_us)


def _fastest_us(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e6


def _ops(group, elems: int) -> dict[str, Callable[[], object]]:
    """The four collectives on vLLM's `group` (a GroupCoordinator) for one message size."""
    import torch.distributed as dist

    n = group.world_size
    x = torch.randn(elems)
    full = torch.randn(n * elems)
    out = torch.empty(n * elems)
    return {"all_reduce": lambda: group.all_reduce(x.clone()),
            "reduce_scatter": lambda: group.reduce_scatter(full, dim=0),
            "all_gather": lambda: group.all_gather(x, dim=0),
            "all_to_all": lambda: dist.all_to_all_single(out, full, group=group.device_group)}


def measure(group, repeats: int = REPEATS) -> dict[str, Link]:
    """This rank's fit per collective kind on `group` (not yet agreed with the other ranks). Eager
    collectives: only `calibrate` calls this, from the plugin's worker-start hook (every rank, right
    after vLLM creates its groups, before any graph is compiled or loaded), never from a pass."""
    import torch.distributed as dist

    n = group.world_size
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    for elems in SIZES:
        for kind, fn in _ops(group, elems).items():
            dist.barrier(group=group.cpu_group)
            points[kind].append((send_bytes(kind, elems, n), _fastest_us(fn, repeats)))
    return {k: fit(points[k]) for k in KINDS}


def agree(links: dict[str, Link], group) -> dict[str, Link]:
    """The group's maximum of every latency and of every per-byte cost (the slowest rank's line),
    rounded to two significant digits: identical on every rank. An eager collective: only `calibrate`
    calls this, at worker start after `measure` (every rank, before any graph is compiled or loaded),
    never from a pass, so no rank that compiles alone can wait in it."""
    import torch.distributed as dist

    vec = torch.tensor([v for k in KINDS for v in (links[k].latency_us, 1.0 / links[k].gbps)], dtype=torch.float64)
    dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group.cpu_group)
    vals = vec.tolist()
    return {k: Link(round_sig(vals[2 * i]), round_sig(1.0 / vals[2 * i + 1]))
            for i, k in enumerate(KINDS)}


def calibrate(group, platform: str, repeats: int = REPEATS) -> LinkCosts:
    """Measure, agree and remember (`fxpasses.link_costs.set_calibrated`) the constants of `group`
    on `platform`; the memory bandwidth stays the platform's. Called at worker start on every rank of
    the group."""
    t0 = time.perf_counter()
    links = agree(measure(group, repeats), group)
    costs = LinkCosts(platform, links, PLATFORMS[platform].memory_gbps,
                      source=f"calibrated at worker start on the TP group (tp {group.world_size}), "
                             "max over ranks, 2 significant digits")
    link_costs.set_calibrated(costs)
    log.info("fxpasses: link costs calibrated in %.0f ms: %s", (time.perf_counter() - t0) * 1e3,
             ", ".join(f"{k} {v.latency_us:g} us + {v.gbps:g} GB/s" for k, v in links.items()))
    return costs
