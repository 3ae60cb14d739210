"""FlashComm2 (o_proj all-to-all over ODP, reduce-scatter over OTP): equivalence with vanilla TP on
real gloo ranks, collectives per site, the once-per-parameter weight all-gather, skips, and the
ODP/OTP rank lists against vllm-ascend's formulas.

Each (tp, K, strategies) case is captured once (the capture is cached in the rank workers) on
`_spec()`: 2 layers, 8 heads on 2 kv heads (GQA 4, heads != tp at TP=4), qkv and o_proj bias, q/k
norm. The equivalence tests compare each capture on TOKEN_SETS (20) token-count sets made from
`examples(1)` drawn seeds (1, tp - 1, tp, tp + 1, 3 tp + 1 and 3 to 6 counts in 1..300), the seed also
choosing the inputs; the TP=2 shape test adds `helpers.SHAPES[2]` at K=1. The fast tier compares
tp2-K1-flashcomm2 and tp4-K2-flashcomm1+flashcomm2 and the shapes with both strategies; the second
tier the other cases (tests/conftest.py HEAVY)."""
import pytest
from hypothesis import given, settings

from helpers import SEEDS, bundled_spec, capture, compare_many, edge_counts, examples, shape_cases

FC2 = ("flashcomm2",)
FC12 = ("flashcomm1", "flashcomm2")
# (tp, all-reduce form, K, strategies); TP=4 uses the vllm.all_reduce form (as on CUDA/NPU)
CASES = [(2, "c10d", 1, FC2), (2, "c10d", 1, FC12),
         (4, "vllm", 1, FC12),  # FlashComm2 K=1 at TP=4 inside FC1+FC2
         (4, "vllm", 2, FC2), (4, "vllm", 2, FC12)]
IDS = [f"tp{t}-K{k}-{'+'.join(s)}" for t, _, k, s in CASES]
LAYERS = 2


def _spec(**kw):
    return bundled_spec(**{"num_hidden_layers": LAYERS, "num_attention_heads": 8, "num_key_value_heads": 2,
                           "head_dim": 8, "qkv_bias": True, "o_proj_bias": True, "qk_norm": True, **kw})


def _capture(pools, tp, form, k, strategies, **kw):
    pool = pools.get(tp, form)
    return pool, capture(pool, _spec(**kw), strategies, flashcomm2_oproj_tp_size=k, strict=True)


# ---- functions run inside the rank workers ------------------------------------------------------

def rank_compare_seeded(state, key, tokens, seed):
    from fxpasses.commands.tp_run.harness import rank_compare
    return rank_compare(state, key, tokens, seed=seed)


def rank_site_collectives(state, key):
    """{prefix: [(kind, group label, group size), ...]} of the collectives in the rewritten graph
    attributed to each layer (new nodes carry their layer's nn_module_stack), plus this rank's groups."""
    from fxpasses import graph_forms as gf
    from fxpasses import topology

    g = state["captures"][key]["cap"].graphs[0].graph
    per = {}
    for n in g.nodes:
        kind = gf.collective_kind(n)
        last = gf.module_stack_last(n)
        if kind is None or last is None:
            continue
        tag = n.meta.get("fxpasses", {})
        per.setdefault(last[0], []).append((kind, tag.get("group", gf.collective_group(n)), tag.get("group_size")))
    grp = {str(k): {"odp": list(v.odp.ranks), "otp": list(v.otp.ranks) if v.otp else None,
                    "shard": v.shard, "odp_rank": v.odp_rank} for k, v in topology.cached_flashcomm2_groups().items()}
    return per, grp


def rank_weight_gathers(state, key, T=5):
    """Drop the ODP weight cache, run the rewritten graph twice; weight all-gathers per call."""
    import torch

    from fxpasses import runtime_ops as fc2
    from fxpasses.commands.tp_run.capture import rebind_token_args
    from fxpasses.commands.tp_run.harness import _tokens

    entry = state["captures"][key]
    cap, ids0, ds = entry["cap"], entry["ids0"], entry["spec"]
    args = rebind_token_args(cap.first_args, ids0, _tokens(T, ds.vocab_size, 0))
    fc2.clear_weight_cache()
    out = []
    with torch.no_grad():
        for _ in range(2):
            before = fc2.weight_stats()
            cap.graphs[0](*list(args))
            after = fc2.weight_stats()
            out.append({k: after[k] - before[k] for k in ("calls", "gathers", "bytes")})
    return out


# ---- equivalence ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,form,k,strategies", CASES, ids=IDS)
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_flashcomm2_matches_vanilla_tp_float64(pools, tp, form, k, strategies, seed):
    pool, summaries = _capture(pools, tp, form, k, strategies)
    for s in summaries:
        assert s["report"]["applied"], s["report"]["reason"]
    compare_many(pool, summaries[0]["key"], seed, edge_counts(tp), fn=rank_compare_seeded, extra=(seed % 1000,))


@pytest.mark.parametrize("spec", shape_cases(2))
@pytest.mark.parametrize("strategies", [FC2, FC12], ids=["fc2", "fc1+fc2"])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_flashcomm2_shapes_match_vanilla_tp2(pools, strategies, spec, seed):
    """`helpers.SHAPES[2]` (GQA 2 with q/k norm and both attention biases; 3 layers on one replicated
    kv head with o_proj and MLP bias), K=1, TOKEN_SETS sets from each drawn seed."""
    pool = pools.get(2, "c10d")
    summaries = capture(pool, spec, strategies, flashcomm2_oproj_tp_size=1, strict=True)
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1
    compare_many(pool, summaries[0]["key"], seed, edge_counts(2), fn=rank_compare_seeded, extra=(seed % 1000,))


# ---- structure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,form,k,strategies", CASES, ids=IDS)
def test_collectives_per_o_proj_site(pools, tp, form, k, strategies):
    from fxpasses.topology import flashcomm2_odp_ranks, flashcomm2_otp_ranks

    pool, summaries = _capture(pools, tp, form, k, strategies)
    n = tp // k
    per_rank = pool.run(rank_site_collectives, summaries[0]["key"])
    for rank, (s, (per, grp)) in enumerate(zip(summaries, per_rank)):
        o_proj = [x for x in s["report"]["sites"] if x["prefix"].endswith("o_proj")]
        assert len(o_proj) == LAYERS
        for x in o_proj:
            assert x["strategy"] == "flashcomm2" and x["status"] == "rewritten", x
            path = x["prefix"].removeprefix("model.")
            colls = per.get(path, [])
            assert [c for c in colls if c[0] == "all_reduce"] == [], colls
            assert [c for c in colls if c[0] == "all_to_all"] == [("all_to_all", "odp", n)], colls
            want_rs = [("reduce_scatter", "otp", k)] if k > 1 else []
            assert [c for c in colls if c[0] == "reduce_scatter"] == want_rs, colls
        after, before = s["report"]["collectives_after"], s["report"]["collectives_before"]
        assert after["all_to_all"] == LAYERS
        if "flashcomm1" in strategies:
            assert after["all_reduce"] == 0
        else:  # only the o_proj all-reduces go; each is followed by all_gather over tp + unpad
            assert after["all_reduce"] == before["all_reduce"] - LAYERS
            assert after["all_gather"] == LAYERS
        # this rank's groups are vllm-ascend's
        g = next(v for key, v in grp.items() if key.startswith(f"({tp}, {k},"))
        odp = next(x for x in flashcomm2_odp_ranks(tp, k) if rank in x)
        assert g["odp"] == odp and g["odp_rank"] == rank % n and g["shard"] == rank // n
        if k > 1:
            assert g["otp"] == next(x for x in flashcomm2_otp_ranks(tp, k) if rank in x)
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1


@pytest.mark.parametrize("tp,form,k", [(2, "c10d", 1), (4, "vllm", 2)])
def test_odp_weight_gathered_on_first_call_only(pools, tp, form, k):
    pool, summaries = _capture(pools, tp, form, k, FC12)
    for first, second in pool.run(rank_weight_gathers, summaries[0]["key"]):
        assert first["calls"] == LAYERS and first["gathers"] == LAYERS
        # [H, D/K + 1] float64 per layer (the n ODP peers' shards side by side, then the bias column)
        spec = _spec()
        d = spec["num_attention_heads"] * spec["head_dim"]
        assert first["bytes"] == LAYERS * spec["hidden_size"] * (d // k + 1) * 8
        assert second == {"calls": LAYERS, "gathers": 0, "bytes": 0}
    for s in summaries:
        for x in s["report"]["sites"]:
            if x["prefix"].endswith("o_proj"):
                assert "gathered once over odp" in x["reason"]


# ---- skips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp,form,k,strategies", [(2, "c10d", 1, FC12), (4, "vllm", 2, FC2)],
                         ids=["tp2-K1-fc1+fc2", "tp4-K2-fc2"])
def test_o_proj_bias_is_added_once_by_tp_rank_0(pools, tp, form, k, strategies):
    """The row bias is in TP rank 0's graph only: every rank rewrites the site alike (same collectives),
    the bias travels with the one-time weight gather, and every token gets it exactly once (K=2: only
    the ODP group of rank 0 holds it, one member per OTP group, so the OTP reduce-scatter adds it once)."""
    pool, summaries = _capture(pools, tp, form, k, strategies, o_proj_bias=True)
    for s in summaries:
        o_proj = [x for x in s["report"]["sites"] if x["prefix"].endswith("o_proj")]
        assert o_proj and all(x["status"] == "rewritten" for x in o_proj), o_proj
        assert s["report"]["collectives_after"]["all_to_all"] == LAYERS
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1
    for results in pool.run(rank_compare_seeded, summaries[0]["key"], [1, 2, 7, 64, 3 * tp + 1], 0):
        for r in results:
            assert r["shape_ok"] and r["rel"] <= 1e-12, r


def rank_update_weights_in_place(state, key, T=9):
    """Scale every floating 2-D graph input (the weights) in place, then compare the graphs: the
    rewritten one must gather the o_proj blocks again (the version counters moved)."""
    import torch

    from fxpasses import runtime_ops
    from fxpasses.commands.tp_run.harness import compare_outputs, graph_args

    cap, args = graph_args(state, key, T)
    with torch.no_grad():
        first = compare_outputs(cap, args, T)
        before = runtime_ops.weight_stats()["gathers"]
        for a in cap.first_args:
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 2:
                a.mul_(1.5).add_(0.01)
        second = compare_outputs(cap, args, T)
        regathered = runtime_ops.weight_stats()["gathers"] - before
        for a in cap.first_args:  # restore for the other tests sharing this capture
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 2:
                a.sub_(0.01).div_(1.5)
    return first, second, regathered


def test_weight_updated_in_place_is_gathered_again(pools):
    pool, summaries = _capture(pools, 2, "c10d", 1, FC12)
    for first, second, regathered in pool.run(rank_update_weights_in_place, summaries[0]["key"]):
        assert first["rel"] <= 1e-12 and second["rel"] <= 1e-12, (first, second)
        assert regathered == LAYERS


def test_packed_weight_is_skipped(pools):
    pool = pools.get(2, "c10d")
    summaries = capture(pool, _spec(), FC2, dtype="float32", pack=True)  # oneDNN packs float32, not float64
    for s in summaries:
        o_proj = [x for x in s["report"]["sites"] if x["prefix"].endswith("o_proj")]
        assert o_proj and all(x["status"] == "skipped" and "not visible" in x["reason"] for x in o_proj), o_proj
        assert not s["report"]["applied"]


# ---- groups (pure) -------------------------------------------------------------------------------

def _ascend_groups(world, tp, k, pp=1):
    """vllm-ascend's init_ascend_model_parallel FlashComm2 loops, restated (K=1: ODP = the TP groups)."""
    dp = world // (tp * pp)
    n = tp // k
    if k == 1:
        return [list(range(b * tp, (b + 1) * tp)) for b in range(world // tp)], []
    otp, odp = [], [[] for _ in range(k * dp * pp)]
    for dpi in range(dp):
        for ppi in range(pp):
            serial = dpi * pp + ppi
            base, odp_base = serial * tp, serial * k
            for i in range(n):
                ranks = []
                for j in range(k):
                    r = base + i + j * n
                    ranks.append(r)
                    odp[odp_base + j].append(r)
                otp.append(ranks)
    return odp, otp


@pytest.mark.parametrize("tp,k", [(tp, k) for tp in (4, 8, 16) for k in (1, 2, 4) if k < tp])
@pytest.mark.parametrize("dp", [1, 2])
def test_group_rank_lists_match_vllm_ascend(tp, k, dp):
    from fxpasses.topology import flashcomm2_odp_ranks, flashcomm2_otp_ranks, flashcomm2_reorder_ids

    world = tp * dp
    odp, otp = _ascend_groups(world, tp, k)
    assert flashcomm2_odp_ranks(tp, k, world) == odp
    assert flashcomm2_otp_ranks(tp, k, world) == otp
    n = tp // k
    assert flashcomm2_reorder_ids(tp, k) == [[i + j * n for j in range(k)] for i in range(n)]
    # every rank is in exactly one ODP group (and one OTP group when K > 1), ODP contiguous
    assert sorted(r for g in odp for r in g) == list(range(world))
    assert all(g == list(range(g[0], g[0] + n)) for g in odp)
    if k > 1:
        assert sorted(r for g in otp for r in g) == list(range(world))


def test_group_sizes_refused():
    from fxpasses.errors import ConfigError
    from fxpasses.topology import flashcomm2_odp_ranks

    for tp, k in ((4, 3), (4, 4), (2, 2), (4, 0)):
        with pytest.raises(ConfigError, match="must divide tp"):
            flashcomm2_odp_ranks(tp, k)
