"""The real vLLM CPU engine at TP=2 compiling as CUDA does: VLLM_COMPILE, the model split at
`vllm::unified_attention_with_output`, a PiecewiseBackend per piece compiling with Inductor, the
pass called by vLLM's PostGradPassManager once per piece and compile range in every worker.

The CPU platform turns VLLM_COMPILE into one-graph compilation; the test-only plugin
`fxpasses.testing.cpu_vllm_compile` (the entry point of tests/vllm_test_plugin, installed by
tools/setup.sh; inert unless FXPASSES_TESTING_VLLM_COMPILE=1)
keeps the requested mode in every vLLM process, for the baseline and the pass engine alike.
FlashComm1 forced at every token count (min_tokens 0): the residual crosses both attention
boundaries token-sharded (`fxpasses.piece_boundaries`, the seam the plugin installs in every vLLM
process), every piece is rewritten and the later two take their boundary all-gather back; greedy
tokens identical and logprobs within the check's tolerance, every piece decided identically on both
ranks, and the bytes per step at T=256 and T=4096 exactly those of the whole-graph FlashComm1 layout
(`comm_volume.analytic_layer_collectives`: the embedding's reduce-scatter, per layer the attention
input's all-gather, two reduce-scatters and the MLP input's all-gather, the output's all-gather).
"""
from __future__ import annotations

import json

import pytest

from fxpasses import comm_volume
from fxpasses.commands import check

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

TP = 2
PIECEWISE = {"mode": 3, "cudagraph_mode": "NONE", "compile_sizes": [],
             "splitting_ops": ["vllm::unified_attention_with_output"],
             "pass_config": {"fuse_rope_kvcache_cat_mla": False}}  # a CUDA-only fusion pass


def _reports(res, rank):
    d = check.Path(res.workdir) / "pass" / "dump" / f"rank{rank}"
    return [json.loads(f.read_text()) for f in sorted(d.glob("graph*.site_report.json"))]


@pytest.mark.parametrize("arch", ["qwen3_moe"])  # routed MoE in pieces; dense llama: test_check_cli
def test_engine_piecewise_flashcomm1_shards_the_piece_boundaries(tmp_path, engine_log, arch):
    res = engine_log(check.run_check(None, TP, "flashcomm1", arch=arch, workdir=tmp_path,
                                     progress=lambda line: None, compilation=PIECEWISE, bytes_at=(256, 4096),
                                     env={"FXPASSES_TESTING_VLLM_COMPILE": "1"}))
    assert res.exit_code == check.EXIT_OK, res.message
    assert res.max_logprob_diff <= res.tolerance, res.message
    assert res.tokens_equal or res.dtype != "float32", res.message  # bfloat16 may break a near-tie
    per_rank = [_reports(res, r) for r in range(TP)]
    # the tiny model's 2 layers split at 2 attentions: 3 pieces, one compile range each
    assert [len(r) for r in per_rank] == [3, 3]
    for reports in per_rank:
        for r in reports:
            assert r["graph_mode"]["kind"] == "piece", r["graph_mode"]
            assert r["graph_mode"]["boundaries"].startswith("sharded: min_tokens=0"), r["graph_mode"]
            assert r["applied"] and r["collectives_after"].get("all_reduce", 0) == 0, (r["reason"], r["collectives_after"])
            assert r["bytes_per_step"]["after"] <= r["bytes_per_step"]["before"]
        assert [r.get("boundary_gathers_taken", 0) for r in reports] == [0, 1, 1]
    decisions = [[(r["applied"], r["collectives_after"], r["fingerprint_digest"]) for r in reports]
                 for reports in per_rank]
    assert decisions[0] == decisions[1]
    hf = json.loads((tmp_path / f"tiny_{arch}" / "config.json").read_text())
    H, L, b = hf["hidden_size"], hf["num_hidden_layers"], 4 if res.dtype == "float32" else 2
    for T in (256, 4096):
        kw = dict(T=T, tp=TP, hidden=H, attn_out=hf["num_attention_heads"] * hf["head_dim"], dtype_bytes=b)
        ring = (TP - 1) * comm_volume.padded(T, TP) * H * b // TP
        whole = ring + L * comm_volume.analytic_layer_bytes("flashcomm1", **kw)["total"] + ring
        assert res.bytes_after[T] == whole, (T, res.bytes_after, whole)
    log = (check.Path(res.workdir) / "pass" / "engine.log").read_text(errors="replace")
    assert "cross vLLM's piece boundaries sharded" in log
    base_log = (check.Path(res.workdir) / "baseline" / "engine.log").read_text(errors="replace")
    assert "'mode': <CompilationMode.VLLM_COMPILE: 3>" in base_log.split("Initializing a V1 LLM engine")[1][:4000]
