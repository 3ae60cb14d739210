"""Soundness: TP-sharded layers that no strategy rewrites (Qwen2-MoE's shared expert: an excluded
MergedColumnParallelLinear, a RowParallelLinear with `reduce_results=False`, a sigmoid gate from a
ReplicatedLinear, summed into a partial MLP output before one all-reduce) consume FlashComm1's
sharded residual stream. Their matmuls must see every token and their partial sums must stay
partial until the graph's own all-reduce; per rank the rewritten graph equals the original, at
TP=2 and TP=4 (at TP=2 a wrong layout can still add the same two numbers).

Shapes and counts: TP=2 runs the two shapes of `TP2` per all-reduce form (2 layers, GQA 2, qkv bias,
shared expert 48 wide; 3 layers, GQA 2, q/k norm, shared expert 16 wide), TP=4 runs `TP4` (2 layers,
8 heads over 4 kv heads, qkv bias, shared expert 96 wide); each on TOKEN_SETS (20) token-count sets
made from `examples(1)` drawn seeds: 1, tp - 1, tp, tp + 1, 3 tp + 1 and 3 to 6 counts in 1..200."""
import pytest
from hypothesis import given, settings

from helpers import SEEDS, bundled_spec, capture, compare_many, edge_counts, examples


TP2 = [
    pytest.param(bundled_spec(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              hidden_size=48, intermediate_size=64, shared_expert_intermediate_size=48,
                              vocab_size=128, qkv_bias=True), id="L2-gqa2-qkvbias-se48"),
    pytest.param(bundled_spec(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              hidden_size=32, intermediate_size=32, shared_expert_intermediate_size=16,
                              vocab_size=128, qk_norm=True), id="L3-gqa2-qknorm-se16"),
]
TP4 = bundled_spec(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8, hidden_size=48,
                   intermediate_size=128, shared_expert_intermediate_size=96, vocab_size=256, qkv_bias=True)


def _check(pools, tp, form, spec, seed):
    pool = pools.get(tp, form)
    summaries = capture(pool, spec)
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        by_prefix = {x["prefix"]: x for x in rep["sites"]}
        shared = [x for p, x in by_prefix.items() if "shared_expert." in p]
        assert shared and all(x["status"] != "rewritten" for x in shared), shared
    compare_many(pool, summaries[0]["key"], seed, edge_counts(tp), hi=200)


@pytest.mark.parametrize("spec", TP2)
@pytest.mark.parametrize("form", ["c10d", "vllm"])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_excluded_tp_sites_stay_exact_tp2(pools, form, spec, seed):
    _check(pools, 2, form, spec, seed)


@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_excluded_tp_sites_stay_exact_tp4(pools, seed):
    _check(pools, 4, "vllm", TP4, seed)
