"""The real vLLM CPU engine at TP=2 compiling as CUDA does: VLLM_COMPILE, the model split at
`vllm::unified_attention_with_output`, a PiecewiseBackend per piece compiling with Inductor, the
pass called by vLLM's PostGradPassManager once per piece and compile range in every worker.

The CPU platform turns VLLM_COMPILE into one-graph compilation; the test-only plugin
`fxpasses.testing.cpu_vllm_compile` (the entry point of tests/vllm_test_plugin, installed by
tools/setup.sh; inert unless FXPASSES_TESTING_VLLM_COMPILE=1)
keeps the requested mode in every vLLM process, for the baseline and the pass engine alike.
FlashComm1 per piece: every tensor crossing a piece boundary stays replicated, each piece is kept
only at no more bytes than its all-reduces, greedy tokens identical and logprobs within the check's
tolerance, every piece decided identically on both ranks, the start-up warning names the setting
that gives the whole graph.
"""
from __future__ import annotations

import json

from fxpasses import check

TP = 2
PIECEWISE = {"mode": 3, "cudagraph_mode": "NONE", "compile_sizes": [],
             "splitting_ops": ["vllm::unified_attention_with_output"],
             "pass_config": {"fuse_rope_kvcache_cat_mla": False}}  # a CUDA-only fusion pass


def _reports(res, rank):
    d = check.Path(res.workdir) / "pass" / "dump" / f"rank{rank}"
    return [json.loads(f.read_text()) for f in sorted(d.glob("graph*.site_report.json"))]


def test_engine_piecewise_flashcomm1_per_piece(tmp_path, engine_log):
    res = engine_log(check.run_check(None, TP, "flashcomm1", arch="llama", workdir=tmp_path,
                                     progress=lambda line: None, compilation=PIECEWISE,
                                     env={"FXPASSES_TESTING_VLLM_COMPILE": "1"}))
    assert res.exit_code == check.EXIT_OK, res.message
    assert res.tokens_equal and res.max_logprob_diff <= res.tolerance, res.message
    assert res.dtype == "float32"  # a dense llama runs in float32 on every CPU (fxpasses.cpu_kernels)
    for T, b in res.bytes_after.items():
        assert b <= res.bytes_before[T], (T, res.bytes_before, res.bytes_after)
    per_rank = [_reports(res, r) for r in range(TP)]
    # the tiny Llama's 2 layers split at 2 attentions: 3 pieces, one compile range each
    assert [len(r) for r in per_rank] == [3, 3]
    for reports in per_rank:
        for r in reports:
            assert r["graph_mode"]["kind"] == "piece", r["graph_mode"]
            assert "use_inductor_graph_partition" in r["graph_mode"]["whole_graph_setting"]
            b = r.get("bytes_per_step")
            assert b is None or b["after"] <= b["before"], b
    decisions = [[(r["applied"], r["collectives_after"], r["fingerprint_digest"]) for r in reports]
                 for reports in per_rank]
    assert decisions[0] == decisions[1]
    log = (check.Path(res.workdir) / "pass" / "engine.log").read_text(errors="replace")
    assert "piece boundary" in log and "use_inductor_graph_partition" in log
    base_log = (check.Path(res.workdir) / "baseline" / "engine.log").read_text(errors="replace")
    assert "'mode': <CompilationMode.VLLM_COMPILE: 3>" in base_log.split("Initializing a V1 LLM engine")[1][:4000]
