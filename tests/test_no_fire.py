"""Where the pass must not fire (TP=1, no linear sites, no strategy) and must refuse clearly."""
import pytest
import torch

from fxpasses.config import FxPassesConfig, load_config, parse_strategies
from fxpasses.context import TPContext
from fxpasses.errors import ConfigError, PatternError
from fxpasses.patterns_loader import load_patterns
from fxpasses.pipeline import run_passes
from fxpasses.commands.tp_run.capture import compile_with_pass


def _capture(fn, *args):
    reports, graphs = [], []

    def hook(g):
        before = str(g)
        reports.append(run_passes(g, FxPassesConfig(strategies=("flashcomm1",)), ctx))
        graphs.append((before, str(g)))

    ctx = TPContext.single()
    compiled, _ = compile_with_pass(fn, hook)
    compiled(*args)
    return reports[0], graphs[0]


def test_tp1_graph_is_left_alone():
    lin = torch.nn.Linear(8, 8)
    rep, (before, after) = _capture(lin, torch.randn(5, 8))
    assert not rep.applied and "tp=1" in rep.reason
    assert before == after


def test_graph_without_linear_sites_is_left_alone():
    from fxpasses.context import GroupRef

    def f(x):
        return torch.relu(x) * 2

    reports = []
    ctx = TPContext(2, 0, 0, 2, GroupRef((0, 1), "0", None))
    compiled, _ = compile_with_pass(f, lambda g: reports.append(
        run_passes(g, FxPassesConfig(strategies=("flashcomm1",)), ctx)))
    compiled(torch.randn(4, 4))
    assert not reports[0].applied and "no linear sites" in reports[0].reason


def test_bad_pattern_file_names_the_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[flashcomm1]\nrow = "o_proj"\n')
    with pytest.raises(PatternError, match=r"flashcomm1\.row must be a list"):
        load_patterns(["default", str(p)])
    p.write_text('[flashcom1]\nrow = ["o_proj"]\n')
    with pytest.raises(PatternError, match=r"unknown key\(s\) \['flashcom1'\]"):
        load_patterns([str(p)])
    with pytest.raises(PatternError, match="does not exist"):
        load_patterns([str(tmp_path / "missing.toml")])
    with pytest.raises(PatternError, match="no built-in pattern set named 'nope'"):
        load_patterns(["nope"])
    p.write_text("[classes\n")
    with pytest.raises(PatternError, match="cannot parse"):
        load_patterns([str(p)])


def test_bad_config_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="unknown strategy 'flashcom1'"):
        parse_strategies("flashcom1")
    with pytest.raises(ConfigError, match="needs tensor parallelism, but tp=1"):
        FxPassesConfig(strategies=("flashcomm1",)).validate_for(1)
    with pytest.raises(ConfigError, match=r"must divide tp=4 .*valid values: \[1, 2\]"):
        FxPassesConfig(strategies=("flashcomm2",), flashcomm2_oproj_tp_size=3).validate_for(4)
    with pytest.raises(ConfigError, match="cannot be combined"):
        FxPassesConfig(strategies=("flashcomm1", "otp"))
    with pytest.raises(ConfigError, match=r"unknown fxpasses config key\(s\) \['strategy'\]"):
        load_config(env={"FXPASSES_CONFIG": '{"strategy": "sp"}'})
    with pytest.raises(ConfigError, match="min_tokens must be a non-negative integer"):
        FxPassesConfig(min_tokens=-1)


def test_strategy_names_and_aliases():
    assert parse_strategies("sp") == ("flashcomm1",)
    assert parse_strategies("flashcomm2+flashcomm1") == ("flashcomm1", "flashcomm2")
    assert parse_strategies(["FC1", "mlp"]) == ("flashcomm1", "mlp_tp")
