"""FlashComm1 on the architectures it exists for, built from real vLLM layers at TP=2 and TP=4:

* routed MoE (ReplicatedLinear router, softmax + top-k, `TinyExperts` holding this rank's expert
  shards: a module the default pattern set does not know) plus a gated shared expert, summed before
  one all-reduce: that all-reduce (a reduce site) becomes the block's reduce-scatter and the block's
  input is all-gathered once, router and experts sharing it (never the logits);
* DeepSeek-MLA-shaped attention: the `disable_tp` latent down-projection and its norms run on the
  shards, the latents (narrower than the hidden state) are what is gathered, and the
  `reshape(T, 1, -1)` of the rope key is rewritten on shards;
* a parallel-residual layer (Cohere): the one all-reduce of attention + MLP becomes the layer's
  reduce-scatter.

Per rank the rewritten graph equals the original (float64, <= 1e-12) on TOKEN_SETS drawn token-count
sets; no all-reduce is left; the graph sends no more bytes per step than the original (the
report's count, checked here against the analytic count of each layout).

Shapes and counts (ci profile; HYPOTHESIS_PROFILE=deep runs 5x the seeds and sets): TP=2 runs the two
explicit shapes of `TP2[arch]` per architecture, TP=4 the one of `TP4[arch]` for MoE and the
parallel-residual layer (MLA runs at TP=2 only; four ranks compiling on two cores: one capture
per test); all have 2 or 3 layers, GQA 2 where the architecture has kv heads
(MLA has none), qkv biases and, at TP=4, heads != tp. Each capture is compared on TOKEN_SETS (20)
token-count sets made from `examples(1)` drawn seeds: 1, tp - 1, tp, tp + 1, 3 tp + 1 and 3 to 6
counts in 1..97."""
from fractions import Fraction

import pytest
from hypothesis import given, settings

from helpers import SEEDS, bundled_spec, byte_ratio, capture, compare_many, edge_counts, examples


TP2 = {
    "moe": [
        pytest.param(bundled_spec(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  hidden_size=48, intermediate_size=32, shared_expert_intermediate_size=16,
                                  num_experts=6, num_experts_per_tok=2, vocab_size=64, qkv_bias=True),
                     id="L2-gqa2-e6-qkvbias"),
        pytest.param(bundled_spec(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  hidden_size=32, intermediate_size=16, shared_expert_intermediate_size=32,
                                  num_experts=4, num_experts_per_tok=2, vocab_size=64, qk_norm=True),
                     id="L3-gqa2-e4-qknorm"),
    ],
    "mla": [
        pytest.param(bundled_spec(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                  hidden_size=64, intermediate_size=32, vocab_size=64, q_lora_rank=24,
                                  kv_lora_rank=16, qk_rope_head_dim=4), id="L2-h4-q24-kv16"),
        pytest.param(bundled_spec(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                  hidden_size=96, intermediate_size=64, vocab_size=64, q_lora_rank=16,
                                  kv_lora_rank=8, qk_rope_head_dim=4), id="L3-h4-q16-kv8"),
    ],
    "parallel_residual": [
        pytest.param(bundled_spec(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  hidden_size=48, intermediate_size=64, vocab_size=64, parallel_residual=True,
                                  qkv_bias=True), id="L2-gqa2-qkvbias"),
        pytest.param(bundled_spec(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  hidden_size=32, intermediate_size=32, vocab_size=64, parallel_residual=True),
                     id="L3-gqa2"),
    ],
}

TP4 = {
    "moe": bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                        hidden_size=48, intermediate_size=64, shared_expert_intermediate_size=32, num_experts=6,
                        num_experts_per_tok=2, vocab_size=128, qkv_bias=True),
    "parallel_residual": bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=8, hidden_size=48, intermediate_size=128, vocab_size=128,
                                      parallel_residual=True, qkv_bias=True),
}


def _rewrite_and_compare(pools, tp, spec, seed):
    pool = pools.get(tp, "vllm")
    summaries = capture(pool, spec)
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        assert rep["collectives_after"]["all_reduce"] == 0, rep["diff"]
        assert rep["collectives_after"]["reduce_scatter"] == rep["collectives_before"]["all_reduce"], rep["diff"]
        assert rep["bytes_per_step"]["after"] <= rep["bytes_per_step"]["before"], rep["bytes_per_step"]
        assert rep["token_layout"]["token_dim"] == 0
    compare_many(pool, summaries[0]["key"], seed, edge_counts(tp), hi=97)
    return summaries


def _all_gathers(s):
    return s["report"]["collectives_after"]["all_gather"]


def _check_moe(pools, tp, spec, seed):
    for s in _rewrite_and_compare(pools, tp, spec, seed):
        L = spec["num_hidden_layers"]
        # per layer: the attention input and the MoE block input, once each; plus the graph output
        assert _all_gathers(s) == 2 * L + 1, s["report"]["diff"]
        # layout units (AR = 2, RS = AG = 1 per hidden-sized row): before 1 + 2 * 2L, after 1 + 4L + 1
        assert byte_ratio(s["report"]) == 1, s["report"]["bytes_per_step"]
        by = {(x["prefix"], x["kind"]): x for x in s["report"]["sites"]}
        block = by[("model.layers.0.mlp", "reduce")]
        assert block["status"] == "rewritten", block


@pytest.mark.parametrize("spec", TP2["moe"])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_moe_block_reduce_scatters_and_gathers_its_input_once_tp2(pools, spec, seed):
    _check_moe(pools, 2, spec, seed)


@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_moe_block_reduce_scatters_and_gathers_its_input_once_tp4(pools, seed):
    _check_moe(pools, 4, TP4["moe"], seed)


def _check_mla(pools, tp, spec, seed):
    for s in _rewrite_and_compare(pools, tp, spec, seed):
        rep = s["report"]
        by = {x["prefix"]: x for x in rep["sites"]}
        a = by["model.layers.0.self_attn.fused_qkv_a_proj"]
        assert a["kind"] == "replicated", a   # the disable_tp override
        # what is gathered before attention is the latents (q_lora + kv_lora + rope < hidden), so
        # the layer moves less than two all-reduces: strictly fewer bytes than the original
        assert rep["bytes_per_step"]["ratio"] < 1.0, rep["bytes_per_step"]
        latent = spec["q_lora_rank"] + spec["kv_lora_rank"] + spec["qk_rope_head_dim"]
        L, H = spec["num_hidden_layers"], spec["hidden_size"]
        # per layer: RS + AG (MLP) + RS + latent gathers; embedding RS; output AG; AR = 2 H per row
        expected = Fraction(H + L * (3 * H + latent) + H, 2 * H * (2 * L + 1))
        assert byte_ratio(rep) == expected, (rep["bytes_per_step"], expected)


@pytest.mark.parametrize("spec", TP2["mla"])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_mla_gathers_latents_not_the_hidden_state_tp2(pools, spec, seed):
    _check_mla(pools, 2, spec, seed)


def _check_parallel_residual(pools, tp, spec, seed):
    for s in _rewrite_and_compare(pools, tp, spec, seed):
        L = spec["num_hidden_layers"]
        # per layer one RS and one AG of the shared normed input (qkv and gate_up read it); output AG
        assert _all_gathers(s) == L + 1, s["report"]["diff"]
        by = {(x["prefix"], x["kind"]): x for x in s["report"]["sites"]}
        assert by[("model.layers.0", "reduce")]["status"] == "rewritten"
        o = by[("model.layers.0.self_attn.o_proj", "row")]
        assert o["status"] == "untouched" and "reduced by the all-reduce of model.layers.0" in o["reason"], o


@pytest.mark.parametrize("spec", TP2["parallel_residual"])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_parallel_residual_layer_reduce_scatters_once_tp2(pools, spec, seed):
    _check_parallel_residual(pools, 2, spec, seed)


@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_parallel_residual_layer_reduce_scatters_once_tp4(pools, seed):
    _check_parallel_residual(pools, 4, TP4["parallel_residual"], seed)
