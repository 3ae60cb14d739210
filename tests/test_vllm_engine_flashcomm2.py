"""FlashComm2 in vLLM's real CPU engine, with `FXPASSES_CPU_PLAIN_WEIGHTS=1` in both engines
(`fxpasses.cpu_plain_weights`): vLLM's CPU linears keep their weights plain, as on CUDA and NPU, so
the o_proj weight is in the graph and FlashComm2 can gather it once. Two cases on a tiny random
Llama: FlashComm2 K=1 alone at TP=2, and FlashComm1+FlashComm2 with K=2 at TP=4 (two ODP groups of
two and an OTP reduce-scatter: rows really move between ranks, which TP=2 cannot show; the CPU
engine runs four ranks on this machine's two cores, `VLLM_CPU_OMP_THREADS_BIND` 0|1|0|1). Greedy
tokens identical and logprobs within the check's tolerance; every o_proj site rewritten to one
all-to-all; the bytes per step at T=256 equal the analytic model of the layout
(`comm_volume.analytic_layer_collectives`: per layer the o_proj all-to-all, (K=2) the OTP
reduce-scatter, then FlashComm2 alone the all-gather back to Replicate and the MLP's all-reduce,
with FlashComm1 the column gathers and the MLP's reduce-scatter; the embedding's all-reduce, or
with FlashComm1 its reduce-scatter and the final all-gather), and the one-time weight gather is
reported apart from them."""
from __future__ import annotations

import json

import pytest

from fxpasses import comm_volume, cpu_plain_weights
from fxpasses.commands import check

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

CASES = {"tp2-fc2-K1": (2, "flashcomm2", 1), "tp4-fc1+fc2-K2": (4, "flashcomm1+flashcomm2", 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_flashcomm2_runs_in_the_cpu_engine_with_plain_weights(case, tmp_path, engine_log, baseline_cache):
    tp, strategies, k = CASES[case]
    # the TP=4 baseline is kept for test_vllm_engine_mutant's TP=4 check (same checkpoint and settings)
    res = engine_log(check.run_check(None, tp, strategies, arch="llama", workdir=tmp_path,
                                     env={cpu_plain_weights.ENV: "1"}, config={"flashcomm2_oproj_tp_size": k},
                                     baseline_cache=baseline_cache, progress=lambda line: None))
    assert res.exit_code == check.EXIT_OK, res.message
    assert res.outputs_equal and (res.tokens_equal or res.dtype != "float32"), res.message
    assert res.max_logprob_diff <= res.tolerance, res.message
    assert not any(k.endswith("onednn_mm") for k in res.kernels), res.kernels  # the weights stayed plain
    o_proj = [s for s in res.sites if s["prefix"].endswith("o_proj")]
    assert o_proj and all(s["status"] == "rewritten" and s["strategy"] == "flashcomm2" for s in o_proj), o_proj
    L = len(o_proj)
    assert res.collectives_after.get("all_to_all") == L, res.collectives_after
    hf = json.loads((tmp_path / "tiny_llama" / "config.json").read_text())
    H, D = hf["hidden_size"], hf["num_attention_heads"] * hf["head_dim"]
    T, b = 256, 4
    kw = dict(T=T, tp=tp, hidden=H, attn_out=D, dtype_bytes=b)
    embed_ar = 2 * (tp - 1) * T * H * b // tp
    ring = (tp - 1) * comm_volume.padded(T, tp) * H * b // tp   # the embedding's rs / the final ag
    assert res.bytes_before[T] == embed_ar + L * comm_volume.analytic_layer_bytes("vanilla", **kw)["total"]
    layers = L * comm_volume.analytic_layer_bytes(strategies, k=k, **kw)["total"]
    expected = ring + layers + ring if "flashcomm1" in strategies else embed_ar + layers
    assert res.bytes_after[T] == expected, (res.bytes_before, res.bytes_after, expected)
    assert res.bytes_after[T] < res.bytes_before[T]
    assert res.one_time_bytes_after > 0  # the o_proj weight gathered once, apart from the per-step bytes
