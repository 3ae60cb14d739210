"""The vllm-ascend route, on a CPU stand-in of vllm-ascend (`fxpasses.testing.ascend_standin`):
vllm_ascend and torch_npu cannot be imported here; vLLM, its layers, gloo and torch's compile stack
are the real ones.

(a) With the current platform being the stand-in (vllm-ascend's `pass_key` "graph_fusion_manager"),
the plugin registers `FxPassesAscendPass` under `inductor_compile_config["graph_fusion_manager"]`
and nothing under Inductor's key; vLLM's own `VllmBackend.configure_post_pass` hands it to the
platform's manager; the stand-in manager takes it and refuses a plain `FxPassesInductorPass`.
(b) At TP=2 over gloo, the tiny decoder compiled through the simulated vllm-ascend path
(aot_autograd, the manager on the GraphModule, eager execution; whole graph or split at attention)
is rewritten and computes what the eager model computes, per rank, for many token counts."""
from __future__ import annotations

import logging
import os
import pickle
from unittest import mock

import pytest

pytest.importorskip("vllm")

from fxpasses.ascend_pass import ASCEND_PASS_KEY, ChainedAscendPass, FxPassesAscendPass  # noqa: E402
from fxpasses.errors import ConfigError  # noqa: E402
from fxpasses.plugin import PASS_KEY, configure_vllm_config, configs_of, platform_pass_key  # noqa: E402
from fxpasses.testing.ascend_harness import rank_ascend_compare, rank_ascend_compile  # noqa: E402
from fxpasses.testing.ascend_standin import AscendPlatformStandin, GraphFusionPassManagerStandin  # noqa: E402
from fxpasses.vllm_pass import FxPassesInductorPass  # noqa: E402
from helpers import bundled_spec, clean_fxpasses_env  # noqa: E402

@pytest.fixture(autouse=True)
def clean_env():
    with clean_fxpasses_env():
        yield


@pytest.fixture
def ascend_platform(monkeypatch):
    """vllm-ascend's platform (as far as compilation goes) is the current one."""
    import vllm.compilation.backends as backends
    import vllm.platforms

    standin = AscendPlatformStandin(vllm.platforms.current_platform)
    monkeypatch.setattr(vllm.platforms, "current_platform", standin)
    monkeypatch.setattr(backends, "current_platform", standin)  # VllmBackend imported it by name
    return standin


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    """A real ModelConfig of a tiny Llama (config.json only: nothing is loaded or downloaded)."""
    import transformers
    from vllm.config import ModelConfig

    from fxpasses.commands.tiny_checkpoints import config_kwargs

    d = tmp_path_factory.mktemp("tiny_llama_config")
    transformers.LlamaConfig(**config_kwargs("llama")).save_pretrained(d)
    return ModelConfig(model=str(d), skip_tokenizer_init=True, dtype="float32")


@pytest.fixture
def vllm_config(model_config):
    """A real VllmConfig at TP=2, built (on this CPU platform) before the stand-in becomes current."""
    from vllm.config import ParallelConfig, VllmConfig

    def make(additional=None, icc=None, tp=2):
        vc = VllmConfig(model_config=model_config, parallel_config=ParallelConfig(tensor_parallel_size=tp),
                        additional_config=dict(additional or {}))
        vc.compilation_config.inductor_compile_config.update(icc or {})
        return vc
    return make


# ---------------------------------------------------------------------------------------------
# (a) registration under vllm-ascend's key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"FXPASSES_CONFIG": '{"strategies": ["flashcomm1"]}'},
                                 {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}], ids=["FXPASSES_CONFIG", "ascend-switch"])
def test_standin_plugin_registers_the_ascend_pass_under_graph_fusion_manager(vllm_config, ascend_platform, env,
                                                                             caplog):
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    vc = vllm_config()
    assert platform_pass_key() == ASCEND_PASS_KEY == "graph_fusion_manager"
    with mock.patch.dict(os.environ, env), caplog.at_level(logging.INFO, logger="fxpasses"):
        p = configure_vllm_config(vc)
        assert p.resolve_config().strategies == ("flashcomm1",)
    icc = vc.compilation_config.inductor_compile_config
    assert isinstance(p, FxPassesAscendPass) and isinstance(p, VllmInductorPass)
    assert icc[ASCEND_PASS_KEY] is p
    assert pickle.loads(pickle.dumps(p)).uuid() == p.uuid()  # travels to the workers with the config
    assert PASS_KEY not in icc
    assert any("plugin registered the pass" in r.getMessage() and "graph_fusion_manager" in r.getMessage()
               for r in caplog.records)
    # vllm-ascend's manager takes it, and refuses the Inductor form (its add() asserts)
    manager = GraphFusionPassManagerStandin()
    manager.add(p)
    assert manager.passes == [p]
    with pytest.raises(AssertionError):
        manager.add(FxPassesInductorPass(strategies=["flashcomm1"]))
    assert manager.passes == [p]


def test_standin_vllm_hands_the_registered_pass_to_the_platform_manager(vllm_config, ascend_platform):
    """vLLM's own VllmBackend.configure_post_pass moves inductor_compile_config[pass_key] into the
    platform's pass manager: the key the plugin chose is the one vLLM reads."""
    from vllm.compilation.backends import VllmBackend

    vc = vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]}})
    p = configure_vllm_config(vc)
    backend = VllmBackend(vc)
    backend.configure_post_pass()
    assert isinstance(backend.pass_manager, GraphFusionPassManagerStandin)
    assert backend.pass_manager.passes == [p]
    assert backend.inductor_config[ASCEND_PASS_KEY] is backend.pass_manager


def test_standin_plugin_inert_when_not_configured(vllm_config, ascend_platform):
    vc = vllm_config(additional={"something_else": 1})
    before = dict(vc.compilation_config.inductor_compile_config)
    assert configure_vllm_config(vc) is None
    assert vc.compilation_config.inductor_compile_config == before


def test_standin_plugin_chains_after_another_pass_under_the_key(vllm_config, ascend_platform):
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    calls = []

    class OtherFusionPass(VllmInductorPass):  # e.g. a fusion pass a user registered under the key
        def __call__(self, graph):
            calls.append(graph)

        def uuid(self):
            return "other-fusion-pass"

    vc = vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]}})
    other = OtherFusionPass(vc)
    vc.compilation_config.inductor_compile_config[ASCEND_PASS_KEY] = other
    p = configure_vllm_config(vc)
    chained = vc.compilation_config.inductor_compile_config[ASCEND_PASS_KEY]
    assert isinstance(chained, ChainedAscendPass) and chained.passes == [other, p]
    GraphFusionPassManagerStandin().add(chained)
    assert configs_of(vc)[0].strategies == ("flashcomm1",)


def test_standin_hand_registration_is_bound_and_validated(vllm_config, ascend_platform):
    ac = {"fxpasses": {"strategies": ["flashcomm1"], "min_tokens": 9}}
    hand = FxPassesAscendPass()
    vc = vllm_config(additional=ac, icc={ASCEND_PASS_KEY: hand})
    assert configure_vllm_config(vc) is hand
    assert vc.compilation_config.inductor_compile_config[ASCEND_PASS_KEY] is hand  # no second pass
    assert hand.inner.additional_config == ac
    assert pickle.loads(pickle.dumps(hand)).resolve_config().min_tokens == 9  # travels to the workers

    bad = vllm_config(tp=1, icc={ASCEND_PASS_KEY: FxPassesAscendPass(strategies=["flashcomm1"])})
    with pytest.raises(ConfigError, match="needs tensor parallelism"):
        configure_vllm_config(bad)


def test_standin_pass_left_under_inductor_key_is_moved(vllm_config, ascend_platform, caplog):
    """On vllm-ascend Inductor's post-grad hook is never called: a hand registration there would be
    silently dead, so the plugin says so and registers that same pass under the platform's key."""
    hand = FxPassesInductorPass(strategies=["flashcomm1"])
    vc = vllm_config(icc={PASS_KEY: hand})
    with caplog.at_level(logging.WARNING, logger="fxpasses"):
        p = configure_vllm_config(vc)
    assert isinstance(p, FxPassesAscendPass) and p.inner is hand
    assert vc.compilation_config.inductor_compile_config[ASCEND_PASS_KEY] is p
    assert any("would never be called" in r.getMessage() for r in caplog.records)


def test_standin_manager_skips_the_pass_outside_its_compile_range():
    """The manager asks is_applicable_for_range (inside vLLM's pass context) before calling a pass."""
    import torch
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    manager = GraphFusionPassManagerStandin()
    manager.add(FxPassesAscendPass(strategies=["flashcomm1"], min_tokens=16))
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    with pass_context(Range(start=1, end=8)):
        assert manager(gm) is gm
    assert manager.calls[0]["called"] == []
    assert manager.passes[0].is_applicable_for_range(Range(start=16, end=8192))


@pytest.mark.parametrize("npugraph_ex", [True, False])
def test_standin_warns_when_npugraph_ex_would_bypass_the_manager(vllm_config, ascend_platform, npugraph_ex,
                                                                 caplog):
    """vllm-ascend's npugraph_ex compiler (on by default, off for its piecewise modes) never calls the
    graph fusion pass manager."""
    vc = vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]},
                                 "ascend_compilation_config": {"enable_npugraph_ex": npugraph_ex}})
    with caplog.at_level(logging.WARNING, logger="fxpasses"):
        configure_vllm_config(vc)
    assert any("npugraph_ex" in r.getMessage() for r in caplog.records) is npugraph_ex


def test_standin_uuid_follows_the_inductor_pass():
    """Same inputs as FxPassesInductorPass.uuid() (configuration, patterns, tp, source), kept apart
    from it, and part of vLLM's compilation hash."""
    from vllm.config import CompilationConfig

    a = FxPassesAscendPass(strategies=["flashcomm1"])
    assert a.uuid() == FxPassesAscendPass(strategies=["flashcomm1"]).uuid()
    assert a.uuid() == pickle.loads(pickle.dumps(a)).uuid()
    assert a.uuid() != FxPassesAscendPass(strategies=["flashcomm1"], min_tokens=16).uuid()
    assert a.uuid() != FxPassesInductorPass(strategies=["flashcomm1"]).uuid()
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": '{"strategies": ["flashcomm1"]}'}):
        assert FxPassesAscendPass().uuid() == a.uuid()  # env or keywords: same resolved configuration

    def h(p):
        return CompilationConfig(inductor_compile_config={ASCEND_PASS_KEY: p}).compute_hash()

    assert h(a) != h(FxPassesAscendPass(strategies=["flashcomm1"], min_tokens=16))


# ---------------------------------------------------------------------------------------------
# (b) the simulated vllm-ascend compile path at TP=2 over gloo
# ---------------------------------------------------------------------------------------------
TOKENS = [1, 2, 3, 4, 5, 7, 8, 13, 16, 33, 100, 257]


@pytest.fixture(scope="module")
def pool(pools):
    return pools.get(2, "vllm")  # vllm.all_reduce in the graph, as on NPU (use_custom_op_collectives)


def _compile(pool, config, graph_mode, env=None):
    return pool.run(rank_ascend_compile, bundled_spec(num_hidden_layers=2), config, graph_mode, env=env)


def _assert_equal(pool, summaries):
    for rank, res in enumerate(pool.run(rank_ascend_compare, summaries[0]["key"], TOKENS)):
        assert [r["T"] for r in res["results"]] == TOKENS
        for r in res["results"]:
            assert r["shape_ok"] and r["rel"] <= 1e-10, (rank, r)
        # one compilation serves every token count: the manager was not called again
        assert res["calls"] == summaries[rank]["calls"], rank


def _once_per_piece(summary):
    assert summary["calls"], "the manager was never called"
    assert len(summary["calls"]) == len(summary["pieces"])
    assert all(c["called"] == ["FxPassesAscendPass"] for c in summary["calls"])


def test_standin_whole_graph_flashcomm1_rewritten_and_equal(pool):
    """Configured the vllm-ascend way (VLLM_ASCEND_ENABLE_FLASHCOMM1=1), strict."""
    env = {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1", "FXPASSES_CONFIG": '{"strict": true}'}
    summaries = _compile(pool, {}, "whole", env=env)
    for s in summaries:
        _once_per_piece(s)
        assert s["pieces"] == ["submod_0"]
        (call,) = s["calls"]
        assert call["before"]["all_reduce"] == 5 and call["after"]["all_reduce"] == 0, call
        assert call["after"]["reduce_scatter"] == 5 and call["after"]["all_gather"] > 0, call
    _assert_equal(pool, summaries)


def test_standin_piecewise_flashcomm2_rewritten_per_piece_and_equal(pool):
    summaries = _compile(pool, {"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": 1, "strict": True},
                         "piecewise")
    for s in summaries:
        _once_per_piece(s)
        assert len(s["pieces"]) == 3  # before layer 0's attention, between, after layer 1's
        first, *later = s["calls"]
        assert first["after"] == first["before"]  # the embedding piece has no o_proj
        for c in later:  # o_proj's all-reduce -> all_to_all over ODP (+ all_gather without FlashComm1)
            assert c["before"]["all_reduce"] == 2 and c["after"]["all_reduce"] == 1, c
            assert c["after"]["all_to_all"] == 1 and c["after"]["all_gather"] == 1, c
    _assert_equal(pool, summaries)


FC1 = {"strategies": ["flashcomm1"]}


def test_standin_piecewise_flashcomm1_shards_the_piece_boundaries_and_equal(pool):
    """FlashComm1 in vllm-ascend's PIECEWISE route (vLLM's `split_graph`, so the same seam:
    `fxpasses.piece_boundaries`): the residual crosses both attention boundaries as this rank's rows,
    written in place by the next piece's add + norm (vllm-ascend runs the graph without Inductor, so
    the seam gives that piece its own copy of the gathered rows), and each later piece takes its
    boundary gather back. Every piece is rewritten, none keeps an all-reduce, the pieces send no more
    bytes than handed over, every piece decides the same on both ranks, and the model stays exact."""
    summaries = _compile(pool, FC1, "piecewise")
    for s in summaries:
        _once_per_piece(s)
        assert s["boundaries"]["shard"] is True and s["boundaries"]["boundaries"] == 2, s["boundaries"]
        assert [r["graph_mode"]["kind"] for r in s["reports"]] == ["piece"] * 3
        assert all(r["applied"] for r in s["reports"]), [r["reason"] for r in s["reports"]]
        for c, r in zip(s["calls"], s["reports"]):
            assert c["after"]["all_reduce"] == 0 and c["after"]["reduce_scatter"] == c["before"]["all_reduce"], c
            assert r["bytes_per_step"]["ratio"] <= 1
        assert [r.get("boundary_gathers_taken", 0) for r in s["reports"]] == [0, 1, 1]
    assert [r["fingerprint_digest"] for r in summaries[0]["reports"]] == \
        [r["fingerprint_digest"] for r in summaries[1]["reports"]]
    _assert_equal(pool, summaries)


def test_standin_whole_graph_mode_is_stated(pool):
    env = {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1", "FXPASSES_CONFIG": '{"strict": true}'}
    for s in _compile(pool, {}, "whole", env=env):
        (r,) = s["reports"]
        assert r["graph_mode"]["kind"] == "whole" and "splitting_ops=[]" in r["graph_mode"]["why"]
