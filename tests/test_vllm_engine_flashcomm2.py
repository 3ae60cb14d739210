"""FlashComm2 in vLLM's real CPU engine at TP=2 (tiny random Llama, K=1), with
`FXPASSES_CPU_PLAIN_WEIGHTS=1` in both engines (`fxpasses.cpu_plain_weights`): vLLM's CPU linears
keep their weights plain, as on CUDA and NPU, so the o_proj weight is in the graph and FlashComm2 can
gather it once. Greedy tokens identical and logprobs within the check's tolerance; every o_proj site
rewritten to one all-to-all; the bytes per step at T=256 equal the analytic model of the layout
(`comm_volume.analytic_layer_collectives`: the embedding's all-reduce, then per layer the o_proj
all-to-all, the all-gather back to Replicate and the MLP's all-reduce), and the one-time weight
gather is reported apart from them."""
from __future__ import annotations

import json

import pytest

from fxpasses import check, comm_volume, cpu_plain_weights

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

TP = 2


def test_flashcomm2_runs_in_the_cpu_engine_with_plain_weights(tmp_path, engine_log):
    res = engine_log(check.run_check(None, TP, "flashcomm2", arch="llama", workdir=tmp_path,
                                     env={cpu_plain_weights.ENV: "1"}, progress=lambda line: None))
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
    kw = dict(T=T, tp=TP, hidden=H, attn_out=D, dtype_bytes=b)
    embed = 2 * (TP - 1) * T * H * b // TP
    assert res.bytes_before[T] == embed + L * comm_volume.analytic_layer_bytes("vanilla", **kw)["total"]
    assert res.bytes_after[T] == embed + L * comm_volume.analytic_layer_bytes("flashcomm2", **kw)["total"], \
        (res.bytes_before, res.bytes_after)
    assert res.one_time_bytes_after > 0  # the o_proj weight gathered once, apart from the per-step bytes
