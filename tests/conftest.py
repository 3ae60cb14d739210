"""Shared fixtures: one gloo TP pool per (world, all-reduce form) and one TP=1 pool per world for the
DP-attention strategies, each alive for the whole session (spawning ranks or re-compiling per example
would not fit 2 cores); the hypothesis profile; the test tiers; a named mutant when asked for."""
import fnmatch
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("dev", deadline=None, suppress_health_check=list(HealthCheck))
# long runs: random (not derandomized) and, through helpers.examples(), 5x the examples and token sets
settings.register_profile("deep", deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every vLLM engine a test starts (they inherit this environment) runs its EngineCore in the process
# that calls `LLM(...)` (vLLM's in-process engine client) instead of a process of its own: the TP
# workers, where the pass runs, are spawned as always. One process fewer to start and import per
# engine, about 11 s of the 48 s a TP=2 engine takes here. Set it to 1 to test the default layout.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# every rank process of the suite's pools activates the mutant named by FXPASSES_TESTING_MUTANT too
os.environ.setdefault("FXPASSES_RANK_INIT", "fxpasses.testing.mutants:activate_from_env")


def pytest_configure(config):
    """FXPASSES_TESTING_MUTANT=<name>: run the suite against a named mutant of the rewrite
    (`fxpasses.testing.mutants`; the pool workers activate it too, FXPASSES_RANK_INIT)."""
    from fxpasses.testing.mutants import activate_from_env

    activate_from_env()


# ---- tiers: `bash tools/test.sh --fast` runs what is neither `engine` nor `heavy` -----------------
# `engine` is marked in the engine test modules themselves. `heavy`: the tests below (fnmatch on the
# node id under tests/), chosen by their measured durations: TP=4 captures beyond the one per
# strategy the fast tier keeps (FlashComm1: test_fc1_equivalence's TP=4 shape; FlashComm2: TP=4 K=2
# FC1+FC2; OTP + MLP-TP: world 4 K=2), second shapes or second collective forms of a case already
# run (FlashComm1 at TP=2 keeps one shape per form; the lowering keeps FlashComm1 and plain TP, whose
# row bias goes through a fused kernel), strategy combinations a TP=4 case of the tier already runs,
# the static-W8A8 twin of a dynamic int8 case, byte-ratio captures in bfloat16, the [1, T, H]
# decoder (its rules and a synthetic graph stay in tier 1), MLA (MoE and parallel residual stay),
# vLLM's whole compiler per test (the piece-boundary contract stays at TP=2: it kills a mutant), CLI
# runs on ranks, wheel builds and fresh-process cache loads. The fast tier still kills every mutant
# (tools/mutation_score.py).
HEAVY = [
    "test_html_report.py::test_the_page_renders_in_headless_chromium",  # Chromium, installed for tier 2
    "test_bad_input.py::test_cli_says_so_when_nothing_was_rewritten",
    "test_batch_of_one.py::*",
    "test_cpu_amx_forms_standin.py::*[[]packed-*",
    "test_compile_cache_restart.py::*",
    "test_cpu_amx_forms_standin.py::*-4]",
    "test_excluded_tp_sites.py::test_excluded_tp_sites_stay_exact_tp4*",
    "test_excluded_tp_sites.py::*L3-*",
    "test_excluded_tp_sites.py::test_excluded_tp_sites_stay_exact_tp2[[]c10d-*",
    "test_fc1_equivalence.py::test_flashcomm1_matches_vanilla_tp2[[]c10d-L3-*",
    "test_fc1_equivalence.py::test_flashcomm1_matches_vanilla_tp2[[]vllm-L2-*",
    "test_fc1_structure.py::test_collectives_per_site[[]4-vllm]",
    "test_fc1_structure.py::test_collectives_per_site[[]2-c10d]",
    "test_flashcomm2.py::*[[]tp4-K1-*",
    "test_flashcomm2.py::*[[]tp4-K2-flashcomm2]",
    "test_flashcomm2.py::*[[]tp4-K2-fc2]",
    "test_flashcomm2.py::test_flashcomm2_matches_vanilla_tp_float64[[]tp2-K1-flashcomm1+flashcomm2]",
    "test_flashcomm2.py::test_flashcomm2_shapes_match_vanilla_tp2[[]fc2-*",
    "test_flashcomm2.py::test_flashcomm2_shapes_match_vanilla_tp2[[]*-L3-*",
    "test_int8_on_the_wire.py::*-4]",
    "test_int8_on_the_wire.py::*-tp4*",
    "test_int8_on_the_wire.py::test_int8_bytes_against_bf16_standin*",
    "test_int8_on_the_wire.py::test_fc1_gathers_int8_and_equals_float_gather_standin[[]w8a8-2]",
    "test_int8_on_the_wire.py::test_fc2_all_to_all_sends_int8_standin[[]w8a8-tp2]",
    "test_int8_on_the_wire.py::test_fc2_int8_with_row_bias_standin",
    "test_lowering.py::test_reference_lowering_matches_unfused_tp4*",
    "test_lowering.py::test_reference_lowering_matches_unfused_tp2[[]c10d-*",
    "test_lowering.py::test_reference_lowering_matches_unfused_tp2[[]vllm-flashcomm2]",
    "test_lowering.py::test_reference_lowering_matches_unfused_tp2[[]vllm-flashcomm1+flashcomm2]",
    "test_mlp_tp_int8.py::*[[]w4-*",
    "test_moe_mla_parallel_residual.py::*_tp4*",
    "test_moe_mla_parallel_residual.py::*[[]L3-*",
    "test_moe_mla_parallel_residual.py::test_mla_gathers_latents_not_the_hidden_state_tp2*",
    "test_npu_forms_standin.py::*[[]tp4-*",
    "test_npu_forms_standin.py::*[[]tp2-w8a8-fc1]",
    "test_otp_int8.py::*[[]w4-*",
    "test_otp_int8.py::test_otp_int8_bytes_against_bf16_standin",
    "test_otp_mlp_tp.py::*[[]w4-both-K4-bias]",
    "test_packaging.py::test_the_wheel_*",
    "test_piecewise_vllm_compile.py::test_piecewise_flashcomm1_*",
    "test_piecewise_vllm_compile.py::test_piecewise_flashcomm2_*",
    "test_piecewise_vllm_compile.py::test_whole_graph_*",
    "test_piecewise_vllm_compile.py::test_auto_*",
    "test_piecewise_vllm_compile.py::test_piecewise_boundary_contract_alone_*[[]4-*",
    "test_pipeline_policies.py::test_a_site_flashcomm2_refuses_goes_to_flashcomm1",
    "test_site_finding.py::test_sites_match_vllm_prefixes[[]c10d-False]",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        nodeid = item.nodeid.split("tests/", 1)[-1]
        if any(fnmatch.fnmatchcase(nodeid, pat) for pat in HEAVY):
            item.add_marker(pytest.mark.heavy)


class Pools:
    def __init__(self):
        self._pools = {}

    def get(self, world: int, form: str = "c10d"):
        from fxpasses.commands.tp_run.pool import TPPool

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


@pytest.fixture(scope="session")
def dp_pools():
    """TP=1 gloo pools (DP-attention ranks), one per world size, for the whole session."""
    from fxpasses.commands.tp_run.pool import TPPool

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


@pytest.fixture(scope="session")
def baseline_cache(tmp_path_factory):
    """One baseline engine run per (checkpoint content, engine settings) for the whole session:
    `fxpasses.commands.check.run_check(baseline_cache=...)` reuses it in every test that compares against it."""
    return tmp_path_factory.mktemp("baseline_runs")


@pytest.fixture
def engine_log(request):
    """engine_log(res): record an `fxpasses.commands.check` result's dtype and vLLM kernels for the summary."""
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
