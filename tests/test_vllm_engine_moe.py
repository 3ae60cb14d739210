"""Regression through the real vLLM CPU engine at TP=2: a tiny random Qwen2-MoE (4 routed experts
top-2, plus vLLM's gated shared expert summed into the routed output before one all-reduce) with
FlashComm1 generates the tokens of the run without the pass, with the same logprobs.

Before the rank-local rule the shared expert (excluded from FlashComm1, a column layer and a row
layer with `reduce_results=False`) ran on the sharded tokens and the greedy tokens diverged from the
second one on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_vllm_engine import TP, assert_same_generation, launch

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

FC1 = {"FXPASSES_CONFIG": json.dumps({"strategies": ["flashcomm1"], "min_tokens": 0})}  # forced: see README "min_tokens"


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    pytest.importorskip("vllm")
    from fxpasses.testing.models.hf_checkpoint import make_tiny_model

    tmp = tmp_path_factory.mktemp("engine_moe")
    model = make_tiny_model(tmp / "tiny_qwen2_moe", model_type="qwen2_moe", dtype="float32")
    base, _ = launch(tmp, "baseline", model, "none", {}, None)
    fc1, log = launch(tmp, "fc1", model, "object", FC1, None)
    return base, fc1, log


def test_qwen2_moe_shared_expert_flashcomm1_matches_baseline(moe_runs):
    base, fc1, _ = moe_runs
    toks = [t for seq in base["batch"] for t in seq]
    assert len(set(toks)) > len(toks) // 4, f"degenerate baseline output {base['batch']}"
    assert_same_generation(base, fc1, "qwen2_moe flashcomm1")


def test_qwen2_moe_shared_expert_runs_on_every_token(moe_runs):
    _, fc1, _ = moe_runs
    for rank in range(TP):
        rep = json.loads((Path(fc1["dump_dir"]) / f"rank{rank}" / "site_report.json").read_text())
        assert rep["applied"], rep["reason"]
        sites = {s["prefix"]: s for s in rep["sites"]}
        shared = [s for p, s in sites.items() if "shared_expert" in p]
        assert shared, sorted(sites)
        assert all(s["status"] != "rewritten" for s in shared), shared
        after = (Path(fc1["dump_dir"]) / f"rank{rank}").glob("*.after.py")
        text = "\n".join(p.read_text() for p in after)
        assert "reduce_scatter" in text
