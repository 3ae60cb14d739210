"""Bad input is refused with the project's error naming the key or file, the value and the fix, at
start-up (config validation, CLI start), never as a traceback inside a compile or a rank worker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fxpasses.config import FxPassesConfig, load_config
from fxpasses.errors import ConfigError, PatternError
from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec
from helpers import run_python_together

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key,value,expect", [
    ("strategies", None, "strategies must be a string"),
    ("strategies", 7, "strategies must be a string"),
    ("strategies", ["flashcomm1", 2], "strategies must be a string"),
    ("strict", "false", "strict must be a boolean"),
    ("check_token_counts", 1, "check_token_counts must be a boolean"),
    ("flashcomm2_oproj_tp_size", "2", "flashcomm2_oproj_tp_size must be a non-negative integer"),
    ("min_tokens", -1, "min_tokens must be a non-negative integer"),
    ("otp_size", True, "otp_size must be a non-negative integer"),
    ("patterns", [], "patterns must be"),
    ("patterns", [3], "patterns must be"),
    ("dump_dir", 5, "dump_dir must be a directory path"),
    ("module_prefix", None, "module_prefix must be a string"),
    ("flashcomm2_oproj_tp_size", 0, "flashcomm2_oproj_tp_size must be >= 1"),
])
def test_every_field_is_type_checked(key, value, expect):
    with pytest.raises(ConfigError, match=expect) as e:
        FxPassesConfig.from_dict({"strategies": ["flashcomm1"], key: value})
    assert repr(value) in str(e.value) or key == "flashcomm2_oproj_tp_size"


def test_config_sources_that_are_not_mappings(tmp_path):
    f = tmp_path / "cfg.json"
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"FXPASSES_CONFIG file {f} holds a list"):
        load_config(env={"FXPASSES_CONFIG": str(f)})
    with pytest.raises(ConfigError, match="holds a list"):
        load_config(env={"FXPASSES_CONFIG": '["flashcomm1"]'})
    t = tmp_path / "cfg.toml"
    t.write_text("strategies = [")
    with pytest.raises(ConfigError, match=f"{t} is not valid TOML"):
        load_config(env={"FXPASSES_CONFIG": str(t)})
    with pytest.raises(ConfigError, match="neither inline JSON nor an existing"):
        load_config(env={"FXPASSES_CONFIG": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE='x' is not a positive integer"):
        load_config(env={"VLLM_ASCEND_FLASHCOMM2_PARALLEL_SIZE": "x"})
    with pytest.raises(ConfigError, match=r"oproj_tensor_parallel_size.\] must be an integer"):
        load_config({"oproj_tensor_parallel_size": "2"}, env={})


def test_pattern_files_with_wrong_types_fail_when_the_config_is_built(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[classes]\nrow = ["RowParallelLinear"]\n[flashcomm1]\nrow = "o_proj"\n')
    with pytest.raises(PatternError, match=rf"{p}: flashcomm1.row must be a list of non-empty strings, got 'o_proj'"):
        FxPassesConfig(strategies=("flashcomm1",), patterns=(str(p),))
    q = tmp_path / "bad2.toml"
    q.write_text('[classes]\nrow = "RowParallelLinear"\n')
    with pytest.raises(PatternError, match="classes.row must be a list"):
        FxPassesConfig(strategies=("flashcomm1",), patterns=(str(q),))
    with pytest.raises(PatternError, match="no built-in pattern set named 'nope'"):
        FxPassesConfig(strategies=("flashcomm1",), patterns=("nope",))


def test_model_configs_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        DecoderSpec.from_file(tmp_path)
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": "big", "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "vocab_size": 64}))
    with pytest.raises(ConfigError, match="hidden_size must be a non-negative number, got 'big'"):
        DecoderSpec.from_file(bad)
    bad.write_text("[]")
    with pytest.raises(ConfigError, match="holds a list"):
        DecoderSpec.from_file(bad)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fxpasses", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_refuses_bad_input_before_starting_ranks(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[classes]\nrow = ["RowParallelLinear"]\n[flashcomm1]\nrow = "o_proj"\n')
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": "big"}))
    cases = [
        (["demo", "--strategy", ""], "names no strategy"),
        (["demo", "--patterns", str(p)], "flashcomm1.row must be a list"),
        (["dump", "--config", str(tmp_path)], "is a directory"),
        (["dump", "--config", str(cfg)], "lacks"),
        (["demo", "--strategy", "nope"], "unknown strategy 'nope'"),
    ]
    # the CLI runs are independent: two at a time
    runs = run_python_together([["-m", "fxpasses", *args] for args, _ in cases], cwd=REPO, timeout=120)
    for (args, expect), (rc, err) in zip(cases, runs):
        assert rc == 2, (args, rc, err[-2000:])
        assert expect in err and "Traceback" not in err, (args, err[-2000:])


def test_cli_says_so_when_nothing_was_rewritten(tmp_path):
    p = tmp_path / "nothing.toml"
    p.write_text('[classes]\nrow = ["RowParallelLinear"]\n[flashcomm1]\nrow = ["no_such_layer"]\n')
    out = _cli("demo", "--layers", "1", "--tokens", "1,5", "--patterns", str(p), "--out", str(tmp_path / "o"),
               timeout=300)
    assert out.returncode == 3, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "NOTHING REWRITTEN" in out.stdout
    # the HTML page of the dumps names every site with the reason it was left
    page = (tmp_path / "o" / "report.html").read_text()
    assert f"HTML report: {tmp_path / 'o' / 'report.html'}" in out.stdout
    assert "model.layers.0.self_attn.o_proj" in page and "model.layers.0.mlp.down_proj" in page
