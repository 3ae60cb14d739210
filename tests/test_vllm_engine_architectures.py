"""FlashComm1 in the real vLLM CPU engine at TP=2 on the architectures it exists for, each a tiny
random checkpoint made from transformers' config classes (`fxpasses.commands.tiny_checkpoints`, nothing
downloaded), run without and with the pass in their own processes by `fxpasses.commands.check.run_check`:

  qwen2_moe    routed experts (4, top-2) and vLLM's gated shared expert summed into the routed output
               before one all-reduce: the block's all-reduce becomes a reduce-scatter, its input is
               gathered once, and the shared expert (a column and a row layer with
               reduce_results=False, no strategy owns it) runs on every token. Before the rank-local
               rule it ran on the sharded tokens and the greedy tokens diverged from the second one on.
  deepseek_v2  MLA + grouped top-k MoE with a shared expert summed in before one all-reduce
  gpt_neox     vLLM's Transformers backend (HF modules): [1, T, H] activations, tokens on dim 1,
               parallel residual; sharded along dim 1, never the batch of one

One engine pair per behaviour (each pair costs about 2.5 minutes of the CI's 90): routed MoE without
a shared expert runs in test_vllm_engine_piecewise (qwen3_moe). Cohere and OLMo2 have no engine pair:
the native parallel-residual layer (one all-reduce of attention + MLP, as in Cohere) is checked per
rank on vLLM's layers in the first tier (test_moe_mla_parallel_residual), the [1, T, H] layout of the
Transformers backend in test_site_finding and test_batch_of_one, and both models end to end only by
hand with `fxpasses check --arch cohere` / `--arch olmo2`.

Greedy tokens must be identical and chosen-token/prompt logprobs within the check's tolerance; the
pass may not send more bytes per step (measured on the graphs around the pass); every all-reduce
left in the graph has a site line with its reason. (At TP=2 equal outputs cannot show a wrong shard
on their own: the site report states the token dimension and the rows per rank, and the pass's
verifier checks every Shard0 value holds ceil(T/tp) rows before it keeps a graph.)
"""
from __future__ import annotations

import json

import pytest

from fxpasses.commands import check

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

TP = 2


def _site_reports(res):
    rank0 = check.Path(res.workdir) / "pass" / "dump" / "rank0"
    return [json.loads(f.read_text()) for f in sorted(rank0.glob("*.site_report.json"))]


def _common(res):
    # identical greedy tokens, or (bfloat16, where vLLM's CPU kernels take no float32) flips at near-ties only
    assert res.outputs_equal and (res.tokens_equal or res.dtype != "float32"), res.message
    assert res.max_logprob_diff <= res.tolerance, res.message
    assert res.bytes_before and res.bytes_after, res.bytes_source
    for T, b in res.bytes_after.items():
        assert b <= res.bytes_before[T], (T, res.bytes_before, res.bytes_after)
    # every all-reduce left in the graph has its line: a site of its own that says why it stays
    left = [s for s in res.sites if s.get("all_reduce") and s["status"] != "rewritten"]
    assert res.collectives_after.get("all_reduce", 0) == len(left), (res.collectives_after, left)
    assert all(s["reason"] for s in left), left


def _rewritten_everywhere(arch, tmp_path, engine_log, token_dim):
    """FlashComm1 on a tiny `arch` checkpoint: equal, every all-reduce a reduce-scatter, every graph
    applied with the stream sharded along `token_dim` over TP ranks."""
    res = engine_log(check.run_check(None, TP, "flashcomm1", arch=arch, workdir=tmp_path, progress=lambda line: None))
    _common(res)
    assert res.exit_code == check.EXIT_OK, res.message
    assert res.collectives_after.get("all_reduce", 0) == 0, res.collectives_after
    assert res.collectives_after["reduce_scatter"] == res.collectives_before["all_reduce"]
    reports = _site_reports(res)
    assert reports and all(r["applied"] for r in reports), [r["reason"] for r in reports]
    for r in reports:
        lay = r["token_layout"]
        assert lay["token_dim"] == token_dim and lay["group_size"] == TP, lay
    return res


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_flashcomm1_rewrites_moe_and_mla_models(arch, tmp_path, engine_log):
    res = _rewritten_everywhere(arch, tmp_path, engine_log, token_dim=0)
    kinds = {(s["kind"], s["status"]) for s in res.sites}
    assert ("reduce", "rewritten") in kinds, kinds  # the MoE block's all-reduce
    # one gather per attention input and per MoE block input, plus the graph output: never logits
    layers = sum(1 for s in res.sites if s["status"] == "rewritten" and s["prefix"].endswith("o_proj"))
    assert res.collectives_after["all_gather"] == 2 * layers + 1, (res.collectives_after, layers)
    shared = [s for s in res.sites if "shared_expert" in s["prefix"]]
    assert shared and all(s["status"] != "rewritten" for s in shared), shared  # runs on every token


@pytest.mark.parametrize("arch", ["gpt_neox"])
def test_a_transformers_backend_model_is_sharded_along_its_token_dim(arch, tmp_path, engine_log):
    _rewritten_everywhere(arch, tmp_path, engine_log, token_dim=1)
