"""`fxpasses check`: bad input is refused with exit 2 and a message naming the fix (fast, no engine),
`fxpasses dump` points MoE/MLA configs to `check`, and one end-to-end run of the real vLLM CPU
engine at TP=2 (baseline + FlashComm1, two engine starts, about 2 minutes here)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fxpasses import cli
from fxpasses.commands import check
from fxpasses.commands import tiny_checkpoints as tc

REPO = Path(__file__).resolve().parents[1]


def _run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_unknown_arch_lists_the_known_ones(tmp_path, capsys):
    rc, text = _run_cli(["check", "--arch", "gpt5", "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert "unknown --arch 'gpt5'" in text
    for a in ("llama", "qwen3_moe", "deepseek_v2", "cohere", "olmo2"):
        assert a in text


def test_model_dir_without_config_json(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    rc, text = _run_cli(["check", "--model", str(tmp_path / "weights"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert "no config.json" in text and "--arch NAME" in text


def test_model_dir_missing(tmp_path, capsys):
    rc, text = _run_cli(["check", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no such directory" in text


@pytest.mark.parametrize("argv, expected", [
    (["check", "--arch", "llama", "--tp", "1"], "--tp must be >= 2"),
    (["check", "--arch", "llama", "--strategy", "bogus"], "unknown strategy 'bogus'"),
    (["check", "--arch", "llama", "--strategy", "otp"], "fxpasses demo --strategy otp"),
    (["check", "--arch", "llama", "--strategy", "flashcomm2", "--flashcomm2-oproj-tp-size", "3"],
     "flashcomm2_oproj_tp_size=3"),
    (["check"], "one of the arguments --model --arch is required"),
    (["check", "--arch", "llama", "--model", "/x"], "not allowed with"),
    (["check", "--arch", "llama", "--tokens", "300"], "max_model_len"),
    (["check", "--model", "/x", "--quant", "w8a8"], "goes with --arch"),
    (["check", "--arch", "qwen3_moe", "--quant", "w8a8_dynamic"], "--arch one of llama, mistral"),
    (["check", "--arch", "llama", "--quant", "int4"], "invalid choice: 'int4'"),
    (["check", "--arch", "llama", "--lowering", "fused"], "invalid choice: 'fused'"),
    (["check", "--arch", "llama", "--bench", "2", "--baseline-cache", "/tmp/kept"], "drop --baseline-cache"),
])
def test_bad_arguments_exit_2(argv, expected, tmp_path, capsys):
    rc, text = _run_cli(argv + ["--out", str(tmp_path)], capsys)
    assert rc == 2, text
    assert expected in text, text
    assert not (tmp_path / "baseline").exists(), "no engine may start on bad input"


@pytest.mark.parametrize("argv, expected", [
    ([], {"min_tokens": 0}),
    (["--lowering", "reference", "--min-tokens", "auto"], {"min_tokens": "auto", "lowering": "reference"}),
    (["--lowering", "off", "--flashcomm2-oproj-tp-size", "2"],
     {"min_tokens": 0, "lowering": "off", "flashcomm2_oproj_tp_size": 2}),
])
def test_check_flags_become_pass_config_keys(argv, expected, tmp_path, monkeypatch, capsys):
    """The pass run's config keys the flags set (what `run_check` is handed; no engine starts)."""
    seen = {}

    def fake_run_check(*a, config=None, **kw):
        seen.update(config)
        raise check.ConfigError("stop here")
    monkeypatch.setattr(check, "run_check", fake_run_check)
    rc, _ = _run_cli(["check", "--arch", "llama", "--out", str(tmp_path)] + argv, capsys)
    assert rc == 2 and seen == expected, seen


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_lines_carry_elapsed_seconds_unless_quiet(quiet, tmp_path, monkeypatch, capsys):
    """What the check is doing is printed as it goes, each line with the seconds since it started;
    `--quiet` prints none of them."""
    def fake_run_check(*a, progress=None, **kw):
        progress("[1/2] baseline engine ...")
        raise check.ConfigError("stop here")
    monkeypatch.setattr(check, "run_check", fake_run_check)
    rc, text = _run_cli(["check", "--arch", "llama", "--out", str(tmp_path)] + (["--quiet"] if quiet else []), capsys)
    assert rc == 2 and "stop here" in text
    lines = [line for line in text.splitlines() if "baseline engine" in line]
    if quiet:
        assert lines == []
    else:
        assert len(lines) == 1 and re.fullmatch(r"\[\s*\d+ s\] \[1/2\] baseline engine \.\.\.", lines[0]), lines


@pytest.mark.parametrize("cfg, what", [
    ({"model_type": "qwen3_moe", "num_experts": 8}, "MoE"),
    ({"model_type": "deepseek_v2", "n_routed_experts": 8, "kv_lora_rank": 512}, "MLA"),
    ({"model_type": "mixtral", "num_local_experts": 8}, "MoE"),
])
def test_dump_points_moe_and_mla_configs_to_check(cfg, what, tmp_path, capsys):
    base = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 256}
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**base, **cfg}))
    rc, text = _run_cli(["dump", "--config", str(f), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    assert f"is an {what} model config" in text
    assert f"fxpasses check --model {tmp_path}" in text and "--arch" in text


def test_compile_seconds_from_vllm_logs():
    assert check.compile_seconds("x INFO [monitor.py:20] torch.compile took 12.50 s in total\n"
                                 "y torch.compile took 13.25 s in total") == (13.25, "torch.compile")
    s, what = check.compile_seconds("(EngineCore pid=1) INFO [core.py:402] init engine (profile, create kv "
                                    "cache, warmup model) took 30.40 s")
    assert s == 30.4 and "init" in what
    assert check.compile_seconds("nothing")[0] is None


def test_hf_checkpoint_reexports_the_core_maker():
    from fxpasses.testing.models import hf_checkpoint
    assert hf_checkpoint.make_tiny_model is tc.make_tiny_model
    assert set(tc.known_archs()) >= {"llama", "qwen2_moe", "qwen3_moe", "deepseek_v2", "cohere", "gpt_neox",
                                     "olmo2"}
    ds = tc.config_kwargs("deepseek_v2")
    assert ds["first_k_dense_replace"] == 1 and ds["n_group"] and ds["q_lora_rank"] and ds["kv_lora_rank"]


# ------------------------------------------------------------------------------------------------
# end to end: two engine runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.engine
def test_check_llama_flashcomm1_end_to_end(tmp_path, baseline_cache):
    """The CLI end to end; its baseline run is kept in the session's cache (`--baseline-cache`), where
    test_vllm_engine_mutant's TP=2 check finds it."""
    pytest.importorskip("vllm")
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FXPASSES_", "VLLM_ASCEND_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    proc = subprocess.run([sys.executable, "-m", "fxpasses", "check", "--arch", "llama", "--tp", "2", "--strategy",
                           "flashcomm1", "--out", str(out), "--json", str(tmp_path / "result.json"),
                           "--baseline-cache", str(baseline_cache)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1200)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    assert "[1/2] baseline engine" in text and "[2/2] engine with flashcomm1" in text
    assert (out / "baseline" / "engine.log").is_file() and len(list(baseline_cache.iterdir())) >= 1
    assert "EQUAL: greedy tokens identical" in text
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["tokens_equal"] and res["max_logprob_diff"] <= res["tolerance"]
    # o_proj and down_proj of both layers and the embedding
    assert res["rewritten"] >= 5 and f"sites (rank 0): {res['rewritten']} rewritten" in text
    assert sorted(res["applied_ranks"]) == [0, 1]
    assert "model.layers.0.self_attn.o_proj" in text
    T = max(res["bytes_before"], key=int)
    assert 0 < res["bytes_after"][T] <= res["bytes_before"][T], res
    assert f"bytes sent per step per rank at T={T} tokens" in text
    assert res["collectives_after"]["reduce_scatter"] >= 5 and res["collectives_after"]["all_reduce"] == 0
    assert res["compile_s"]["baseline"] and res["compile_s"]["pass"]
    assert res["pass_ms"].get("total", 0) > 0 and "pass time (rank 0)" in text
    page = (out / "report.html").read_text()
    assert "HTML report:" in text and "model.layers.0.self_attn.o_proj" in page and "EQUAL" in page


def _result(**kw) -> check.CheckResult:
    base = dict(exit_code=-1, model="m", tp=2, strategies=["flashcomm1"], tokens_equal=True, outputs_equal=True,
                max_logprob_diff=0.0,
                tolerance=1e-3, rewritten=5, applied_ranks=[0, 1], sites=[{"status": "rewritten"}] * 5,
                collectives_before={"all_reduce": 5, "reduce_scatter": 0},
                collectives_after={"all_reduce": 0, "reduce_scatter": 5},
                bytes_before={256: 1000}, bytes_after={256: 1000})
    return check.CheckResult(**{**base, **kw})


@pytest.mark.parametrize("kw, code, words", [
    ({}, 0, "EQUAL"),
    ({"tokens_equal": False, "outputs_equal": False, "first_divergence": "prompt 0"}, 1, "greedy tokens diverged"),
    # a flip at a near-tie (fxpasses.commands.greedy_compare) is equal, and the verdict says so
    ({"tokens_equal": False, "near_ties": ["prompt 3 (4 tokens) at generated token 3"]}, 0, "near-tie"),
    ({"max_logprob_diff": 0.5}, 1, "logprobs differ"),
    ({"rewritten": 0, "applied_ranks": [], "sites": [], "reasons": ["the graph has no linear sites"]}, 3,
     "no site was rewritten"),
    # column sites marked rewritten but every row site skipped: no collective changed
    ({"collectives_after": {"all_reduce": 5, "reduce_scatter": 0}, "rewritten": 4,
      "sites": [{"status": "skipped", "reason": "dim 0 is not the token dimension"}]}, 3,
     "left every collective as it was"),
    ({"bytes_after": {256: 1001}}, 4, "MORE BYTES"),
])
def test_exit_codes(kw, code, words):
    res = check.decide(_result(**kw))
    assert res.exit_code == code and words in res.message, res.message
    assert f"[exit {code}]" in check.format_report(res)
