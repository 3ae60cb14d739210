"""OTP (o_proj tensor parallel) and MLP-TP for DP-attention deployments.

The original graph on every rank is the TP=1 graph (vLLM TP size 1, world 2 or 4, full weights) and
every rank feeds its OWN tokens (same count B on every rank of a group, different ids). Property: on
every rank the rewritten graph's output equals that rank's own TP=1 output (float64, rel <= 1e-12)
for TOKEN_SETS token-count sets per drawn seed, with and without bias, OTP alone, MLP-TP alone and both, K = world and K = 2
in a world of 4. Structure: per OTP site one all_to_all + one reduce_scatter, per MLP one all_gather +
one reduce_scatter, nothing else. Each case is captured once (rank_capture caches by shape+config),
so the structural and must-refuse tests below reuse the captures of the property test.
"""
import pytest
from hypothesis import given, settings

from fxpasses.topology import dp_group_ranks
from fxpasses.errors import ConfigError
from fxpasses.commands.tp_run.dp_harness import rank_compare_own_tokens, rank_run_rewritten
from fxpasses.commands.tp_run.harness import rank_capture
from helpers import SEEDS, bundled_spec, compare_many, edge_counts, examples

# id, world, strategies, config extras, spec extras (each case its own explicit, non-minimal shape:
# 2 or 3 layers, GQA != 1, biases where the case names them)
_W2_SHAPE = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8, "hidden_size": 48,
             "intermediate_size": 96}
CASES = [
    ("w2-otp-bias", 2, ("otp",), {}, {**_W2_SHAPE, "o_proj_bias": True, "qkv_bias": True}),
    ("w2-mlp-bias", 2, ("mlp_tp",), {}, {**_W2_SHAPE, "num_hidden_layers": 3, "mlp_bias": True,
                                         "intermediate_size": 80}),
    ("w2-both-check", 2, ("otp", "mlp_tp"), {"check_token_counts": True}, {}),
    ("w4-both-K4-bias", 4, ("otp", "mlp_tp"), {}, {"o_proj_bias": True, "mlp_bias": True}),
    ("w4-both-K2", 4, ("otp", "mlp_tp"), {"otp_size": 2, "mlp_tp_size": 2}, {"o_proj_bias": True, "qk_norm": True}),
]
BY_ID = {c[0]: c for c in CASES}


def _spec(layers=2, extra=None):
    return bundled_spec(num_hidden_layers=layers, **(extra or {}))


def _capture(pool, spec, strategies, cfg, pack=False, dtype="float64"):
    return pool.run(rank_capture, spec, {"strategies": list(strategies), **cfg}, dtype, pack)


def _k(world, cfg, key):
    return cfg.get(key) or world


@pytest.mark.parametrize("case", [c[0] for c in CASES])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_dp_rewrite_matches_own_tp1_output(dp_pools, case, seed):
    """Each case of CASES on its own shape (the bundled 2-layer GQA-2 shape unless the case gives
    another), compared on TOKEN_SETS (20) sets of equal per-rank token counts made from `examples(1)`
    drawn seeds: 1, 2, world - 1, world, world + 1, 3 world + 1 and 3 to 6 counts in 1..300."""
    _, world, strategies, cfg, spec_extra = BY_ID[case]
    pool = dp_pools(world)
    spec = bundled_spec(**{"num_hidden_layers": 2, **spec_extra})
    summaries = _capture(pool, spec, strategies, cfg)
    layers = spec["num_hidden_layers"]
    for s in summaries:
        rep = s["report"]
        assert rep["applied"], rep["reason"]
        _check_structure(rep, world, strategies, cfg, layers)
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1
    compare_many(pool, summaries[0]["key"], seed, edge_counts(world) | {2}, fn=rank_compare_own_tokens)


def _check_structure(rep, world, strategies, cfg, layers):
    n_otp = layers if "otp" in strategies else 0
    n_mlp = layers if "mlp_tp" in strategies else 0
    assert rep["collectives_before"] == {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0, "all_to_all": 0}
    assert rep["collectives_after"] == {"all_reduce": 0, "reduce_scatter": n_otp + n_mlp,
                                        "all_gather": n_mlp, "all_to_all": n_otp}
    k_otp, k_mlp = _k(world, cfg, "otp_size"), _k(world, cfg, "mlp_tp_size")
    per_layer = []
    if n_otp:
        per_layer += [["all_to_all", "otp", str(k_otp)], ["reduce_scatter", "otp", str(k_otp)]]
    if n_mlp:
        per_layer += [["all_gather", "mlp_tp", str(k_mlp)], ["reduce_scatter", "mlp_tp", str(k_mlp)]]
    assert [list(f) for f in rep["fingerprint"]] == per_layer * layers
    by_status = {}
    for site in rep["sites"]:
        by_status.setdefault(site["status"], []).append(site["prefix"])
        if site["strategy"]:
            assert site["status"] == "rewritten", site
        else:  # embedding, qkv_proj and everything not owned stay as they were
            assert site["status"] == "untouched", site
    assert len(by_status["rewritten"]) == n_otp + 2 * n_mlp
    for name in strategies:
        extra = rep[name]
        assert extra["equal_token_counts_required"] and extra["k"] == (k_otp if name == "otp" else k_mlp)
        assert extra["load_time_shard_saving_bytes"] == extra["full_weight_bytes"] - extra["full_weight_bytes"] // extra["k"]
    assert any("stays resident" in n for n in rep["notes"])


def test_unequal_token_counts_raise_clearly(dp_pools):
    """check_token_counts: unequal B across the group is a clear error on every rank, not a hang."""
    _, world, strategies, cfg, spec_extra = BY_ID["w2-both-check"]
    pool = dp_pools(world)
    summaries = _capture(pool, _spec(extra=spec_extra), strategies, cfg)
    assert all(s["report"]["applied"] for s in summaries)
    assert "check_group_tokens" in summaries[0]["after"]
    out = pool.run(rank_run_rewritten, summaries[0]["key"], [3, 5])
    for msg in out:
        assert "TokenCountMismatch" in msg and "[3, 5]" in msg and "same number of tokens" in msg, msg
    assert pool.run(rank_run_rewritten, summaries[0]["key"], [4, 4]) == ["ok", "ok"]


def test_packed_weights_are_skipped_with_reason(dp_pools):
    pool = dp_pools(2)
    # oneDNN packs float32 (it has no float64 kernel): the weight disappears into _C.onednn_mm
    summaries = _capture(pool, _spec(layers=1), ("otp", "mlp_tp"), {}, pack=True, dtype="float32")
    for s in summaries:
        rep = s["report"]
        assert not rep["applied"]
        owned = [x for x in rep["sites"] if x["strategy"]]
        assert owned and all(x["status"] == "skipped" and "not visible" in x["reason"] for x in owned), owned
        assert "onednn_mm" in s["after"] and "all_to_all" not in s["after"]


def test_group_layouts():
    assert dp_group_ranks(4, 2) == [[0, 1], [2, 3]]
    assert dp_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert dp_group_ranks(8, 2, "strided") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for bad in (1, 3, 0):
        with pytest.raises(ConfigError, match="divide the world size"):
            dp_group_ranks(4, bad)
