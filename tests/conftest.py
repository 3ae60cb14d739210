"""Shared fixtures: one gloo TP pool per (world, all-reduce form), alive for the whole session
(spawning ranks or re-compiling per example would not fit 2 cores), TP=1 pools for the
DP-attention strategies per test module, and the hypothesis profile."""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("dev", deadline=None, suppress_health_check=list(HealthCheck))
# long runs: random (not derandomized) and, through helpers.examples(), 5x the examples and token sets
settings.register_profile("deep", deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Pools:
    def __init__(self):
        self._pools = {}

    def get(self, world: int, form: str = "c10d"):
        from fxpasses.testing.pool import TPPool

        key = (world, form)
        if key not in self._pools or self._pools[key].broken:  # a pool shut down after a hang is replaced
            self._pools[key] = TPPool(world, form)
        return self._pools[key]

    def close(self):
        for p in self._pools.values():
            p.close()


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()


@pytest.fixture(scope="module")
def dp_pools():
    """TP=1 gloo pools (DP-attention ranks), one per world size, for this module."""
    from fxpasses.testing.pool import TPPool

    pools = {}

    def get(world):
        if world not in pools:
            pools[world] = TPPool(world, tp=1)
        return pools[world]

    yield get
    for p in pools.values():
        p.close()


# ---- the CPU and the kernels each engine test exercised (vLLM picks kernels by CPU) -------------
_ENGINE_RUNS: list[str] = []


def pytest_report_header(config):
    from fxpasses import cpu_kernels

    return f"fxpasses: {cpu_kernels.describe()}"


@pytest.fixture
def engine_log(request):
    """engine_log(res): record an `fxpasses.check` result's dtype and vLLM kernels for the summary."""
    def log(res):
        _ENGINE_RUNS.append(f"{request.node.nodeid}: dtype {res.dtype}, cpu {res.cpu}, kernels "
                            f"{', '.join(res.kernels) or '(none recorded)'}"
                            + (f"; near-ties {len(res.near_ties)}" if res.near_ties else ""))
        return res
    return log


def pytest_terminal_summary(terminalreporter):
    if _ENGINE_RUNS:
        terminalreporter.section("vLLM CPU kernels exercised by the engine tests")
        for line in _ENGINE_RUNS:
            terminalreporter.write_line(line)
