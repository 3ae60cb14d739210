"""Configuration of the vLLM pass: every source, the vllm-ascend mapping, invalid combinations and
their messages, the plugin's decisions, and `uuid()` (changes with every configured value, stable
otherwise). Fast: no engine is started."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from fxpasses.config import FxPassesConfig, load_config  # noqa: E402
from helpers import CLEAN_ENV, clean_fxpasses_env, examples  # noqa: E402
from fxpasses.errors import ConfigError  # noqa: E402
from fxpasses.plugin import PASS_KEY, configure_vllm_config  # noqa: E402
from fxpasses.vllm_pass import ChainedInductorPass, FxPassesInductorPass  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLEAN = CLEAN_ENV


@pytest.fixture(autouse=True)
def clean_env():
    with clean_fxpasses_env():
        yield


def fake_vllm_config(tp=2, world=None, additional=None, icc=None):
    """The attributes of a VllmConfig the plugin reads."""
    return SimpleNamespace(
        model_config=object(),
        additional_config=additional if additional is not None else {},
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, world_size=world or tp),
        compilation_config=SimpleNamespace(inductor_compile_config=dict(icc or {}), mode=2),
    )


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def test_defaults_do_nothing():
    cfg = FxPassesInductorPass().resolve_config()
    assert cfg == FxPassesConfig() and cfg.strategies == ()


def test_env_inline_json():
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": '{"strategies": "sp", "min_tokens": 8}'}):
        cfg = FxPassesInductorPass().resolve_config()
    assert cfg.strategies == ("flashcomm1",) and cfg.min_tokens == 8


def test_env_json_file(tmp_path):
    f = tmp_path / "fx.json"
    f.write_text(json.dumps({"strategies": ["flashcomm1"], "strict": True}))
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": str(f)}):
        cfg = FxPassesInductorPass().resolve_config()
    assert cfg.strategies == ("flashcomm1",) and cfg.strict is True


def test_env_toml_file(tmp_path):
    f = tmp_path / "fx.toml"
    f.write_text('[fxpasses]\nstrategies = ["flashcomm1", "flashcomm2"]\nflashcomm2_oproj_tp_size = 2\n')
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": str(f)}):
        cfg = FxPassesInductorPass().resolve_config()
    assert cfg.strategies == ("flashcomm1", "flashcomm2") and cfg.flashcomm2_oproj_tp_size == 2


def test_additional_config_through_bind():
    p = FxPassesInductorPass().bind(fake_vllm_config(additional={"fxpasses": {"strategies": ["fc1"]}}))
    assert p.resolve_config().strategies == ("flashcomm1",)
    # the binding travels with the pass into worker processes
    q = pickle.loads(pickle.dumps(p))
    assert q.resolve_config().strategies == ("flashcomm1",)


def test_additional_config_found_on_the_stack_when_unbound():
    """Inside a compile vLLM has no current config; the pass finds the model's `vllm_config`."""
    from vllm.config import VllmConfig

    class Model:  # stands for the compiled nn.Module (it has `self.vllm_config`)
        def __init__(self, vc):
            self.vllm_config = vc

        def compile(self, p):
            return p.resolve_config()

    vc = VllmConfig.__new__(VllmConfig)
    object.__setattr__(vc, "additional_config", {"fxpasses": {"strategies": ["flashcomm1"], "min_tokens": 3}})
    cfg = Model(vc).compile(FxPassesInductorPass())
    assert cfg.strategies == ("flashcomm1",) and cfg.min_tokens == 3


def test_dump_dir_env():
    with mock.patch.dict(os.environ, {"FXPASSES_DUMP_DIR": "/tmp/somewhere"}):
        assert FxPassesInductorPass().resolve_config().dump_dir == "/tmp/somewhere"


def test_priority_env_over_additional_over_ascend():
    ac = {"fxpasses": {"strategies": ["flashcomm1"], "min_tokens": 5, "strict": True}}
    env = {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1", "FXPASSES_CONFIG": '{"min_tokens": 7}'}
    with mock.patch.dict(os.environ, env):
        cfg = FxPassesInductorPass().bind(fake_vllm_config(additional=ac)).resolve_config()
    assert cfg.min_tokens == 7            # FXPASSES_CONFIG wins
    assert cfg.strict is True             # from additional_config
    assert cfg.strategies == ("flashcomm1",)  # additional_config's list replaces the ascend mapping


def test_constructor_overrides_win():
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": '{"strategies": "flashcomm1", "min_tokens": 7}'}):
        cfg = FxPassesInductorPass(min_tokens=64).resolve_config()
    assert cfg.min_tokens == 64 and cfg.strategies == ("flashcomm1",)


def test_constructor_rejects_unknown_key():
    with pytest.raises(ConfigError, match="unknown fxpasses config key"):
        FxPassesInductorPass(min_token=3)


# ---------------------------------------------------------------------------------------------
# vllm-ascend migration switches
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, additional, strategies, extra", [
    ({}, {"finegrained_tp_config": {"oproj_tensor_parallel_size": 2}}, ("otp",), {"otp_size": 2}),
    ({}, {"finegrained_tp_config": {"mlp_tensor_parallel_size": 4}}, ("mlp_tp",), {"mlp_tp_size": 4}),
    ({}, {"finegrained_tp_config": {"oproj_tensor_parallel_size": 2, "lmhead_tensor_parallel_size": 2}}, ("otp",),
     {"otp_size": 2}),
    ({}, {"finegrained_tp_config": {"oproj_tensor_parallel_size": 0, "mlp_tensor_parallel_size": 0}}, (), {}),
], ids=["oproj", "mlp", "lmhead-not-ours", "zero-is-off"])
def test_ascend_switches_of_today_are_mapped_without_a_warning(env, additional, strategies, extra, caplog):
    with mock.patch.dict(os.environ, env), caplog.at_level(logging.INFO, logger="fxpasses"):
        cfg = FxPassesInductorPass().bind(fake_vllm_config(additional=additional or {})).resolve_config()
    assert cfg.strategies == strategies
    for k, v in extra.items():
        assert getattr(cfg, k) == v
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("mapped to" in r.getMessage() for r in caplog.records) == bool(strategies)


@pytest.mark.parametrize("env, additional, strategies, extra, today", [
    ({"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1"}, None, ("flashcomm1",), {}, '"strategies": ["flashcomm1"]'),
    ({}, {"enable_flashcomm1": True}, ("flashcomm1",), {}, '"strategies": ["flashcomm1"]'),
    ({"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "2"}, None, ("flashcomm2",), {"flashcomm2_oproj_tp_size": 2},
     '"flashcomm2_oproj_tp_size": K'),
    ({}, {"enable_flashcomm2_parallel_size": 2}, ("flashcomm2",), {"flashcomm2_oproj_tp_size": 2},
     '"flashcomm2_oproj_tp_size": K'),
    ({"VLLM_ASCEND_ENABLE_FLASHCOMM1": "1", "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "1"}, None,
     ("flashcomm1", "flashcomm2"), {"flashcomm2_oproj_tp_size": 1}, '"fxpasses": {"strategies": ["flashcomm'),
    ({"VLLM_ASCEND_ENABLE_MLP_OPTIMIZE": "1"}, None, ("mlp_tp",), {},
     '["finegrained_tp_config"]["mlp_tensor_parallel_size"]=K'),
    ({}, {"oproj_tensor_parallel_size": 2}, ("otp",), {"otp_size": 2},
     '["finegrained_tp_config"]["oproj_tensor_parallel_size"]=K'),
], ids=["fc1-env", "fc1-additional", "fc2-env", "fc2-additional", "fc1+fc2-env", "mlp-env", "oproj-top-level"])
def test_removed_ascend_switches_are_mapped_and_named_in_a_warning(env, additional, strategies, extra, today,
                                                                    caplog):
    with mock.patch.dict(os.environ, env), caplog.at_level(logging.INFO, logger="fxpasses"):
        cfg = FxPassesInductorPass().bind(fake_vllm_config(additional=additional or {})).resolve_config()
    assert cfg.strategies == strategies
    for k, v in extra.items():
        assert getattr(cfg, k) == v
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    names = list(env) + list(additional or {})
    for name in names:
        assert any(name in w and "no longer a vllm-ascend switch" in w and today in w for w in warned), (name, warned)


def test_off_switches_change_nothing(caplog):
    env = {"VLLM_ASCEND_ENABLE_FLASHCOMM1": "0", "VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "",
           "VLLM_ASCEND_ENABLE_MLP_OPTIMIZE": "0"}
    with mock.patch.dict(os.environ, env), caplog.at_level(logging.INFO, logger="fxpasses"):
        cfg = FxPassesInductorPass().bind(fake_vllm_config(additional={"enable_flashcomm1": False})).resolve_config()
    assert cfg.strategies == ()
    assert not any("mapped to" in r.getMessage() for r in caplog.records)


def test_two_switches_disagreeing_on_a_size_are_refused():
    with pytest.raises(ConfigError, match=r"additional_config\[.oproj_tensor_parallel_size.\]=4 and "
                                          r"additional_config\[.finegrained_tp_config.\].*=2 disagree on otp_size"):
        load_config({"finegrained_tp_config": {"oproj_tensor_parallel_size": 2}, "oproj_tensor_parallel_size": 4},
                    env={})


def test_ascend_bad_integer():
    with mock.patch.dict(os.environ, {"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "two"}):
        with pytest.raises(ConfigError, match="is not a positive integer"):
            FxPassesInductorPass().resolve_config()


# ---------------------------------------------------------------------------------------------
# invalid combinations fail at start-up (the plugin's configure step) with the fix in the message
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fx, tp, message", [
    ({"strategies": ["flashcomm1"]}, 1, "tensor_parallel_size >= 2"),
    ({"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": 3}, 4, r"valid values: \[1, 2\]"),
    ({"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": 2}, 2, r"must divide tp=2 and be smaller"),
    ({"strategies": ["otp"], "otp_size": 3}, 4, r"otp_size=3 must be >= 2 and divide the world size 4"),
    ({"strategies": ["mlp_tp"], "mlp_tp_size": 1}, 2, r"mlp_tp_size=1 must be >= 2"),
    ({"strategies": ["flashcomm1", "otp"]}, 2, "cannot be combined"),
    ({"strategies": ["flashcomm3"]}, 2, "unknown strategy 'flashcomm3'; choose from"),
    ({"strategies": ["flashcomm1"], "min_tokens": -1}, 2, "min_tokens must be a non-negative integer"),
    ({"strategy": ["flashcomm1"]}, 2, r"unknown fxpasses config key\(s\) \['strategy'\]"),
])
def test_invalid_combinations(fx, tp, message):
    vc = fake_vllm_config(tp=tp, additional={"fxpasses": fx})
    with pytest.raises(ConfigError, match=message):
        configure_vllm_config(vc)
    assert PASS_KEY not in vc.compilation_config.inductor_compile_config


@pytest.mark.parametrize("value, message", [
    ("{not json", "FXPASSES_CONFIG is not valid JSON"),
    ("/nonexistent/fx.toml", "neither inline JSON nor an existing"),
])
def test_invalid_env_source(value, message):
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": value}):
        with pytest.raises(ConfigError, match=message):
            configure_vllm_config(fake_vllm_config())


def test_invalid_config_of_a_hand_registered_pass_fails_at_start_up():
    p = FxPassesInductorPass(strategies=["flashcomm1"])
    vc = fake_vllm_config(tp=1, icc={PASS_KEY: p})
    with pytest.raises(ConfigError, match="needs tensor parallelism"):
        configure_vllm_config(vc)


# ---------------------------------------------------------------------------------------------
# the plugin registers only when configured
# ---------------------------------------------------------------------------------------------
def test_plugin_inert_when_not_configured():
    vc = fake_vllm_config(additional={"something_else": 1})
    assert configure_vllm_config(vc) is None
    assert vc.compilation_config.inductor_compile_config == {}


def test_plugin_inert_for_a_config_without_model():
    vc = fake_vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]}}, tp=1)
    vc.model_config = None
    assert configure_vllm_config(vc) is None  # e.g. a bare VllmConfig() in a tool: no error


def test_plugin_registers_from_env():
    vc = fake_vllm_config()
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": '{"strategies": ["flashcomm1"]}'}):
        p = configure_vllm_config(vc)
    assert isinstance(p, FxPassesInductorPass)
    assert vc.compilation_config.inductor_compile_config[PASS_KEY] is p


def test_plugin_registers_from_additional_config_and_binds_it():
    vc = fake_vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"], "min_tokens": 9}})
    p = configure_vllm_config(vc)
    assert vc.compilation_config.inductor_compile_config[PASS_KEY] is p
    assert p.additional_config == {"fxpasses": {"strategies": ["flashcomm1"], "min_tokens": 9}}


def test_plugin_configured_without_strategy_registers_nothing():
    vc = fake_vllm_config(additional={"fxpasses": {"min_tokens": 9}})
    assert configure_vllm_config(vc) is None
    assert PASS_KEY not in vc.compilation_config.inductor_compile_config


def test_plugin_binds_a_hand_registered_pass_without_adding_a_second():
    p = FxPassesInductorPass()
    vc = fake_vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]}}, icc={PASS_KEY: p})
    assert configure_vllm_config(vc) is p
    assert vc.compilation_config.inductor_compile_config[PASS_KEY] is p
    assert p.resolve_config().strategies == ("flashcomm1",)


def test_plugin_chains_after_another_users_pass():
    from vllm.compilation.passes.inductor_pass import CallableInductorPass

    calls = []
    other = CallableInductorPass(lambda g: calls.append("other"), uuid="other-pass")
    vc = fake_vllm_config(additional={"fxpasses": {"strategies": ["flashcomm1"]}}, icc={PASS_KEY: other})
    configure_vllm_config(vc)
    chained = vc.compilation_config.inductor_compile_config[PASS_KEY]
    assert isinstance(chained, ChainedInductorPass)
    assert chained.passes[0] is other and isinstance(chained.passes[1], FxPassesInductorPass)
    u = chained.uuid()
    other._uuid = "other-pass-v2"
    assert chained.uuid() != u


def test_plugin_register_is_idempotent_and_wraps_post_init():
    from vllm.config import VllmConfig

    from vllm.distributed import parallel_state as ps

    from fxpasses import plugin

    before = VllmConfig.__post_init__
    mp_before = ps.initialize_model_parallel
    try:
        plugin._installed = False
        plugin.register()
        wrapped = VllmConfig.__post_init__
        assert getattr(wrapped, "_fxpasses_wrapped", False)
        # worker start: fxpasses' groups are created right after vLLM's own
        mp_wrapped = ps.initialize_model_parallel
        assert getattr(mp_wrapped, "_fxpasses_wrapped", False)
        plugin._installed = False
        plugin.register()  # a second load in the same process must not wrap twice
        assert VllmConfig.__post_init__ is wrapped and ps.initialize_model_parallel is mp_wrapped
    finally:
        VllmConfig.__post_init__ = getattr(before, "__wrapped__", before)
        ps.initialize_model_parallel = getattr(mp_before, "__wrapped__", mp_before)
        plugin._installed = False


def test_plugin_switch_off():
    from vllm.config import VllmConfig

    from fxpasses import plugin

    before = VllmConfig.__post_init__
    plugin._installed = False
    with mock.patch.dict(os.environ, {"FXPASSES_PLUGIN": "0"}):
        plugin.register()
    assert VllmConfig.__post_init__ is before and not plugin._installed


# ---------------------------------------------------------------------------------------------
# uuid
# ---------------------------------------------------------------------------------------------
VALUES = {
    "strategies": st.sampled_from([[], ["flashcomm1"], ["flashcomm2"], ["flashcomm1", "flashcomm2"], ["otp"],
                                   ["mlp_tp"]]),
    "flashcomm2_oproj_tp_size": st.integers(1, 8),
    "otp_size": st.integers(0, 8),
    "mlp_tp_size": st.integers(0, 8),
    "min_tokens": st.one_of(st.just("auto"), st.integers(0, 4096)),
    "link_costs": st.one_of(st.just({}), st.fixed_dictionaries({"platform": st.sampled_from(["cpu", "cuda", "npu"])}),
                            st.fixed_dictionaries({"all_gather": st.fixed_dictionaries(
                                {"latency_us": st.integers(0, 100), "gbps": st.integers(1, 400)})})),
    "patterns": st.sampled_from([["default"]]),
    "strict": st.booleans(),
    "dump_dir": st.one_of(st.none(), st.sampled_from(["/tmp/a", "/tmp/b"])),
    "module_prefix": st.sampled_from(["model", "language_model.model"]),
    "check_token_counts": st.booleans(),
    "weight_format": st.sampled_from(["unknown", "nd", "nd_float", "nz"]),
    "lowering": st.sampled_from(["auto", "off", "reference"]),
    "int8_comm": st.sampled_from(["auto", "off"]),
}
configs = st.fixed_dictionaries(VALUES)


def _uuid_with_env(fx: dict) -> str:
    with mock.patch.dict(os.environ, {"FXPASSES_CONFIG": json.dumps(fx)}):
        return FxPassesInductorPass().uuid()


def test_uuid_covers_every_config_field():
    """The strategy below iterates over VALUES; it must name every field of the schema."""
    from dataclasses import fields
    assert {f.name for f in fields(FxPassesConfig)} == set(VALUES)


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs, key=st.sampled_from(sorted(VALUES)), data=st.data())
def test_uuid_changes_with_any_configured_value(cfg, key, data):
    new_value = data.draw(VALUES[key].filter(lambda v: v != cfg[key]), label="new value")
    changed = {**cfg, key: new_value}
    if FxPassesConfig.from_dict(cfg) == FxPassesConfig.from_dict(changed):
        return  # aliases / canonical order make them the same configuration
    assert _uuid_with_env(cfg) != _uuid_with_env(changed)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs)
def test_uuid_stable_for_equal_configs_from_any_source(cfg):
    a = _uuid_with_env(cfg)
    assert a == _uuid_with_env(cfg)                                       # repeatable
    # (a binding without a TP size: the drawn sizes need not fit any particular tp)
    b = FxPassesInductorPass().bind(SimpleNamespace(additional_config={"fxpasses": cfg})).uuid()
    assert a == b                                                         # env or additional_config
    c = FxPassesInductorPass(**cfg).uuid()
    assert a == c                                                         # or constructor keywords
    assert pickle.loads(pickle.dumps(FxPassesInductorPass(**cfg))).uuid() == c  # across processes
    # spelling does not matter, only the resolved configuration
    reordered = {**cfg, "strategies": list(reversed(cfg["strategies"]))}
    assert _uuid_with_env(reordered) == a


def test_uuid_changes_with_pattern_file_contents(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\n[classes]\nrow = ["RowParallelLinear"]\n[flashcomm1]\nrow = ["o_proj"]\n')
    fx = {"strategies": ["flashcomm1"], "patterns": [str(f)]}
    a = _uuid_with_env(fx)
    f.write_text('name = "mine"\n[classes]\nrow = ["RowParallelLinear"]\n[flashcomm1]\nrow = ["o_proj", "down_proj"]\n')
    assert _uuid_with_env(fx) != a


def test_uuid_changes_with_tp_rank_world(monkeypatch):
    from fxpasses import vllm_pass

    p = FxPassesInductorPass(strategies=["flashcomm1"])
    seen = set()
    for live in (None, {"tp": 2, "rank": 0, "global_rank": 0, "world": 2},
                 {"tp": 2, "rank": 1, "global_rank": 1, "world": 2},
                 {"tp": 4, "rank": 1, "global_rank": 1, "world": 4},
                 {"tp": 4, "rank": 1, "global_rank": 5, "world": 8}):
        monkeypatch.setattr(vllm_pass, "_live_tp", lambda live=live: live)
        seen.add(p.uuid())
    assert len(seen) == 5


def test_uuid_raises_for_invalid_config_at_live_tp(monkeypatch):
    from fxpasses import vllm_pass

    monkeypatch.setattr(vllm_pass, "_live_tp", lambda: {"tp": 1, "rank": 0, "global_rank": 0, "world": 1})
    with pytest.raises(ConfigError, match="needs tensor parallelism"):
        FxPassesInductorPass(strategies=["flashcomm1"]).uuid()


def test_vllm_hash_includes_the_pass_uuid():
    """vLLM keys its AOT compile cache by `compilation_config.compute_hash()`; the pass's uuid must
    reach it, or a cache hit would serve a graph compiled without (or with another) rewrite."""
    from vllm.config import CompilationConfig

    def h(p):
        return CompilationConfig(inductor_compile_config={PASS_KEY: p}).compute_hash()

    base = CompilationConfig().compute_hash()
    a = h(FxPassesInductorPass(strategies=["flashcomm1"]))
    b = h(FxPassesInductorPass(strategies=["flashcomm1"], min_tokens=16))
    assert len({base, a, b}) == 3
    assert a == h(FxPassesInductorPass(strategies=["flashcomm1"]))


# ---------------------------------------------------------------------------------------------
# min_tokens and compile ranges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start, end, min_tokens, applicable", [
    (1, 8, 0, True), (1, 8, 16, False), (16, 2048, 16, True), (9, 15, 16, False), (17, 17, 16, True),
])
def test_compile_range_applicability(start, end, min_tokens, applicable):
    from vllm.config.utils import Range

    p = FxPassesInductorPass(strategies=["flashcomm1"], min_tokens=min_tokens)
    assert p.is_applicable_for_range(Range(start, end)) is applicable


# ---------------------------------------------------------------------------------------------
# the string route resolves in a fresh vLLM process exactly as vLLM does it
# ---------------------------------------------------------------------------------------------
def test_string_route_resolves_to_the_pass_instance():
    code = (
        "import sys\n"
        "from vllm.config import CompilationConfig\n"
        "from vllm.compilation.passes.inductor_pass import CallableInductorPass\n"
        "c = CompilationConfig(inductor_passes={'post_grad_custom_post_pass': 'fxpasses.vllm_pass_instance'})\n"
        "p = c.inductor_compile_config['post_grad_custom_post_pass']\n"
        "print(type(p).__module__ + '.' + type(p).__qualname__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True,
                         timeout=300, env=CLEAN)
    assert out.returncode == 0, out.stderr[-3000:]
    # not wrapped in CallableInductorPass (whose uuid would ignore the configuration)
    assert out.stdout.strip().splitlines()[-1] == "fxpasses.vllm_pass.FxPassesInductorPass"


def test_importing_fxpasses_does_not_import_vllm():
    code = "import sys, fxpasses; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True,
                         timeout=120, env=CLEAN)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"
