"""FlashComm1 on [1, T, H] graphs: vLLM's Transformers backend runs Hugging Face modules with a
leading batch dim of one, so the token dim is dim 1 (`tokenwise.token_dim_of`). The tiny decoder
with `batch_of_one=True` (real vLLM layers: VocabParallelEmbedding on [1, T] ids, QKV/Merged column
layers, Row layers, RMSNorms on [1, T, H]) is rewritten on every rank over real gloo groups and
compared with the original graph in float64.

Shape (explicit, non-minimal): TP=4 only (at TP=2 a reduce-scatter's rows could hide in a sum of
two; the [1, T, H] layout at TP=2 runs in test_site_finding and in the engine tier's gpt_neox):
2 layers, hidden 64, 8 heads over 2 kv heads (GQA 4, heads != tp, a kv head shared by two ranks),
head_dim 8, qkv and o_proj biases, q/k norm.
Token counts: each hypothesis example draws a seed, and `TOKEN_SETS` sets of 4 to 7 counts in
1..300 are made from it, each with 1, tp - 1, tp + 1 and 3 tp added (so even the first example
varies); `examples(2)` examples, through the profile.
"""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TOKEN_SETS, bundled_spec, capture, examples

SHAPES = {
    2: dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=96, vocab_size=128, qkv_bias=True, o_proj_bias=True, qk_norm=True),
    4: dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
            intermediate_size=128, vocab_size=256, qkv_bias=True, o_proj_bias=True, qk_norm=True),
}


def token_sets(seed: int, tp: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [sorted(set(rnd.sample(range(1, 301), rnd.randint(4, 7))) | {1, max(1, tp - 1), tp + 1, 3 * tp})
            for _ in range(TOKEN_SETS)]


@pytest.mark.parametrize("tp", [4])  # TP=4: a wrong rank's rows cannot hide in a sum of two
@settings(max_examples=examples(2))
@given(seed=st.integers(0, 2**31 - 1))
def test_flashcomm1_shards_a_batch_of_one_graph_along_dim_1(pools, tp, seed):
    from fxpasses.commands.tp_run.harness import rank_compare

    pool = pools.get(tp, "vllm")
    summaries = capture(pool, bundled_spec(batch_of_one=True, **SHAPES[tp]))
    layers = SHAPES[tp]["num_hidden_layers"]
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        # embedding + o_proj + down_proj per layer: every all-reduce became a reduce-scatter
        assert rep["collectives_before"]["all_reduce"] == 1 + 2 * layers
        assert rep["collectives_after"]["all_reduce"] == 0
        assert rep["collectives_after"]["reduce_scatter"] == 1 + 2 * layers
        assert rep["token_layout"]["token_dim"] == 1, rep["token_layout"]
        assert "f64[1, ((s" in s["after"]  # the residual stream runs as [1, ceil(T/tp), H] shards
    for tokens in token_sets(seed, tp):
        for rank, results in enumerate(pool.run(rank_compare, summaries[0]["key"], tokens)):
            assert [r["T"] for r in results] == tokens
            for r in results:
                assert r["shape_ok"], (rank, tokens, r)
                assert r["rel"] <= 1e-12, (rank, tokens, r)
