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
report's count, checked here against the analytic count of each layout). TP=2 draws its model
shapes (two examples each); TP=4 (four ranks compiling on two cores: one capture per test) runs the
explicit, non-minimal shapes of `TP4`: 2 layers, 8 heads over 4 kv heads (heads != tp, GQA 2) or
MLA's 8 heads, qkv biases, and the wider of the drawn sizes."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import bundled_spec, capture, compare_many, examples


def token_counts(tp):
    return st.lists(st.integers(1, 97), min_size=2, max_size=5).map(lambda xs: sorted(set(xs) | {1, tp + 1}))


def _moe(draw, tp, **kw):
    return bundled_spec(num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=tp, num_key_value_heads=tp,
                        head_dim=8, hidden_size=draw(st.sampled_from([32, 48])),
                        intermediate_size=draw(st.sampled_from([8 * tp, 16 * tp])),
                        shared_expert_intermediate_size=8 * tp, num_experts=draw(st.sampled_from([4, 6])),
                        num_experts_per_tok=2, vocab_size=32 * tp, **kw)


@st.composite
def moe_models(draw, tp):
    return _moe(draw, tp)


@st.composite
def mla_models(draw, tp):
    hidden = draw(st.sampled_from([64, 96]))
    return bundled_spec(num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=2 * tp,
                        num_key_value_heads=2 * tp, head_dim=8, hidden_size=hidden,
                        intermediate_size=16 * tp, vocab_size=32 * tp, q_lora_rank=draw(st.sampled_from([16, 24])),
                        kv_lora_rank=draw(st.sampled_from([8, 16])), qk_rope_head_dim=4)


@st.composite
def parallel_residual_models(draw, tp):
    return bundled_spec(num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=tp, num_key_value_heads=tp,
                        head_dim=8, hidden_size=draw(st.sampled_from([32, 48])),
                        intermediate_size=draw(st.sampled_from([16 * tp, 32 * tp])), vocab_size=32 * tp,
                        parallel_residual=True)


TP4 = {
    "moe": bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                        hidden_size=48, intermediate_size=64, shared_expert_intermediate_size=32, num_experts=6,
                        num_experts_per_tok=2, vocab_size=128, qkv_bias=True),
    "mla": bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                        hidden_size=96, intermediate_size=64, vocab_size=128, q_lora_rank=24, kv_lora_rank=16,
                        qk_rope_head_dim=4),
    "parallel_residual": bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=8, hidden_size=48, intermediate_size=128, vocab_size=128,
                                      parallel_residual=True, qkv_bias=True),
}


def _rewrite_and_compare(pools, tp, spec, data):
    pool = pools.get(tp, "vllm")
    summaries = capture(pool, spec)
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        assert rep["collectives_after"]["all_reduce"] == 0, rep["diff"]
        assert rep["collectives_after"]["reduce_scatter"] == rep["collectives_before"]["all_reduce"], rep["diff"]
        assert rep["bytes_per_step"]["after"] <= rep["bytes_per_step"]["before"], rep["bytes_per_step"]
        assert rep["token_layout"]["token_dim"] == 0
    compare_many(pool, summaries[0]["key"], data, token_counts(tp))
    return summaries


def _all_gathers(s):
    return s["report"]["collectives_after"]["all_gather"]


def _check_moe(pools, tp, data, spec=None):
    spec = spec or data.draw(moe_models(tp))
    for s in _rewrite_and_compare(pools, tp, spec, data):
        L = spec["num_hidden_layers"]
        # per layer: the attention input and the MoE block input, once each; plus the graph output
        assert _all_gathers(s) == 2 * L + 1, s["report"]["diff"]
        # layout units (AR = 2, RS = AG = 1 per hidden-sized row): before 1 + 2 * 2L, after 1 + 4L + 1
        assert s["report"]["bytes_per_step"]["ratio"] == pytest.approx(1.0)
        by = {(x["prefix"], x["kind"]): x for x in s["report"]["sites"]}
        block = by[("model.layers.0.mlp", "reduce")]
        assert block["status"] == "rewritten", block


@settings(max_examples=2)
@given(data=st.data())
def test_moe_block_reduce_scatters_and_gathers_its_input_once_tp2(pools, data):
    _check_moe(pools, 2, data)


@settings(max_examples=examples(1))
@given(data=st.data())
def test_moe_block_reduce_scatters_and_gathers_its_input_once_tp4(pools, data):
    _check_moe(pools, 4, data, TP4["moe"])


def _check_mla(pools, tp, data, spec=None):
    spec = spec or data.draw(mla_models(tp))
    for s in _rewrite_and_compare(pools, tp, spec, data):
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
        expected = (H + L * (3 * H + latent) + H) / (2 * H * (2 * L + 1))
        assert rep["bytes_per_step"]["ratio"] == pytest.approx(expected, rel=1e-3), (rep["bytes_per_step"], expected)


@settings(max_examples=2)
@given(data=st.data())
def test_mla_gathers_latents_not_the_hidden_state_tp2(pools, data):
    _check_mla(pools, 2, data)


@settings(max_examples=examples(1))
@given(data=st.data())
def test_mla_gathers_latents_not_the_hidden_state_tp4(pools, data):
    _check_mla(pools, 4, data, TP4["mla"])


def _check_parallel_residual(pools, tp, data, spec=None):
    spec = spec or data.draw(parallel_residual_models(tp))
    for s in _rewrite_and_compare(pools, tp, spec, data):
        L = spec["num_hidden_layers"]
        # per layer one RS and one AG of the shared normed input (qkv and gate_up read it); output AG
        assert _all_gathers(s) == L + 1, s["report"]["diff"]
        by = {(x["prefix"], x["kind"]): x for x in s["report"]["sites"]}
        assert by[("model.layers.0", "reduce")]["status"] == "rewritten"
        o = by[("model.layers.0.self_attn.o_proj", "row")]
        assert o["status"] == "untouched" and "reduced by the all-reduce of model.layers.0" in o["reason"], o


@settings(max_examples=2)
@given(data=st.data())
def test_parallel_residual_layer_reduce_scatters_once_tp2(pools, data):
    _check_parallel_residual(pools, 2, data)


@settings(max_examples=examples(1))
@given(data=st.data())
def test_parallel_residual_layer_reduce_scatters_once_tp4(pools, data):
    _check_parallel_residual(pools, 4, data, TP4["parallel_residual"])
