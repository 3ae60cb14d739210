"""The pass inside vLLM's own VLLM_COMPILE path (VllmBackend, split_graph, PiecewiseBackend per piece
and compile range, PostGradPassManager), as CUDA runs it, on real gloo ranks with vLLM's layers.

Semantics per graph mode (docs/deployment.md, "Deployment"): in FX-split pieces FlashComm2 works per piece;
FlashComm1 forced at every token count shards the residual across the piece boundaries
(`fxpasses.piece_boundaries`) and the pieces together equal the whole-graph rewrite; with a gate
that leaves some range alone the boundaries stay replicated and a piece is kept only where it moves
no more bytes. In whole-graph mode FlashComm1 is sequence parallel across layers. Every (piece,
range) decides identically on every rank.

Reference: the eager model on the same weights. vLLM's RMSNorm computes in float32 even for a
float64 model, so compiled and eager differ by ~1e-6 relative whatever the pass does; the bound
1e-5 is still four orders below what a wrong collective costs (a missing or doubled reduction
changes the output by O(1) relative), and TP=4 separates reduce-scatter from all-reduce.

Shape: the bundled one (2 layers, 4 heads on 2 kv heads, H 64, I 128), compiled once per test and
rank; each test runs its drawn seeds' token-count sets (3 per seed, each with 1 and 9 so both compile
ranges run, plus 3 to 6 counts in 1..48) through vLLM's compiled pieces.
"""
import pytest
from hypothesis import given, settings

from helpers import SEEDS, bundled_spec, examples, token_sets

ENDPOINTS = [8]            # compile ranges [1, 8] and [9, max_num_batched_tokens]
RANGES = {"(1, 8)", "(9, 2048)"}
REL = 1e-5
PIECE_SETTING = "use_inductor_graph_partition"


@pytest.fixture(scope="module")
def pools():
    """Pools of this module only: a VllmBackend-compiled model must not meet another module's
    `torch._dynamo.reset()` in the same worker."""
    from fxpasses.commands.tp_run.pool import TPPool

    made = {}

    def get(tp):
        if tp not in made:
            made[tp] = TPPool(tp, "vllm")
        return made[tp]

    yield get
    for p in made.values():
        p.close()


def _compile(pool, mode, strategies, endpoints=ENDPOINTS, mutant=None, rewrite_pieces=True, **cfg):
    from fxpasses.testing.piecewise import rank_compile_vllm

    spec = bundled_spec(num_hidden_layers=2)
    return pool.run(rank_compile_vllm, spec, {"strategies": list(strategies), **cfg}, mode, "float64", 7,
                    endpoints, mutant=mutant, rewrite_pieces=rewrite_pieces)


def _run_all(pool, key, seed, reach=(1, 9)):
    """3 token-count sets made from the drawn seed (`reach` in every set, so both compile ranges are
    reached, plus 3 to 6 counts in 1..48); assert every rank's output equals the eager model; return
    the pass calls of every rank."""
    from fxpasses.testing.piecewise import rank_compare_vllm

    calls = None
    for tokens in token_sets(seed, reach, hi=48, n=3):
        per_rank = pool.run(rank_compare_vllm, key, tokens)
        for rank, out in enumerate(per_rank):
            assert [r["T"] for r in out["results"]] == tokens
            for r in out["results"]:
                assert r["shape_ok"] and r["rel"] <= REL, (rank, r)
        calls = [out["calls"] for out in per_rank]
    return calls


def _same_on_every_rank(calls):
    """Every (piece, range) took the same decision with the same rewritten graph on every rank."""
    def decision(c):
        r = c["report"]
        return (c["range"], r["applied"], r["reason"], r["collectives_after"], r["fingerprint_digest"],
                r["graph_mode"]["kind"])
    for other in calls[1:]:
        assert [decision(c) for c in other] == [decision(c) for c in calls[0]]


def _bytes_never_grow(calls):
    for c in calls:
        b = c["report"].get("bytes_per_step")
        if c["report"]["applied"] and b:
            assert b["after"] <= b["before"], c


def _per_range(calls, key):
    """{range: summed report[key] over the pieces} (collective counts or bytes)."""
    out: dict = {}
    for c in calls:
        v = c["report"][key]
        if isinstance(v, dict):
            acc = out.setdefault(c["range"], {})
            for k, x in v.items():
                acc[k] = acc.get(k, 0) + x
        else:
            out[c["range"]] = out.get(c["range"], 0) + v
    return out


def _after_bytes(calls):
    return {r: v for r, v in _per_range([{"range": c["range"], "report": {"b": c["report"]["bytes_per_step"]["after"]}}
                                         for c in calls], "b").items()}


def _whole_graph_calls(pool, strategies, **cfg):
    """The whole-graph rewrite of the same model, compiled for one range (its bytes per step and
    collectives do not depend on the range). Compiled *before* the pieces it is compared with: a
    compile resets Dynamo, and the model compiled last is the one a test may run again."""
    whole = _compile(pool, "whole", strategies, endpoints=None, **cfg)
    (call,) = whole[0]["calls"]
    assert call["report"]["applied"] and call["report"]["graph_mode"]["kind"] == "whole"
    return call["report"]


def _assert_like_the_whole_graph(pieces, whole):
    """Every piece rewritten; in every compile range the pieces together run the collectives of the
    whole-graph rewrite (none left as an all-reduce) and send exactly its bytes per step."""
    assert all(c["report"]["applied"] for c in pieces), [c["report"]["reason"] for c in pieces]
    for r, counts in _per_range(pieces, "collectives_after").items():
        assert counts == whole["collectives_after"], (r, counts, whole["collectives_after"])
        assert counts.get("all_reduce", 0) == 0
    assert set(_after_bytes(pieces).values()) == {whole["bytes_per_step"]["after"]}, \
        (_after_bytes(pieces), whole["bytes_per_step"])


@pytest.mark.parametrize("tp", [2])  # TP=4 in pieces: the FC1+FC2 test below and the boundary contract's
@settings(max_examples=examples(2))
@given(seed=SEEDS)
def test_piecewise_flashcomm1_shards_the_piece_boundaries(pools, seed, tp):
    """FlashComm1 forced at every token count (min_tokens 0): the residual crosses both attention
    boundaries as this rank's ceil(T/tp) rows (`fxpasses.piece_boundaries`, decided once before vLLM's
    split); each later piece takes its boundary gather back (its first norm runs on the shards) and
    the first two hand their residual over sharded. Both compile ranges, T=1 included, equal the eager
    model on every rank; the three pieces together send exactly the whole-graph rewrite's bytes and run
    its collectives (5 reduce-scatters, 5 all-gathers for 2 layers)."""
    pool = pools(tp)
    whole = _whole_graph_calls(pool, ["flashcomm1"])
    s = _compile(pool, "piecewise", ["flashcomm1"])
    assert s[0]["pieces"] == 3   # embedding..qkv of layer 0, o_proj..qkv of layer 1, o_proj..norm
    assert s[0]["boundaries"] == {"shard": True, "boundaries": 2,
                                  "reason": "min_tokens=0: FlashComm1 applies at every token count"}
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    mine = calls[0]
    assert len(mine) == 3 * len(RANGES) and {c["range"] for c in mine} == RANGES  # once per piece and range
    assert all(c["report"]["graph_mode"]["kind"] == "piece" for c in mine)
    assert all(c["report"]["graph_mode"]["boundaries"].startswith("sharded: min_tokens=0") for c in mine)
    # pieces 2 and 3 start from a sharded residual: their boundary all-gather was taken back
    for r in RANGES:
        assert [c["report"].get("boundary_gathers_taken", 0) for c in mine if c["range"] == r] == [0, 1, 1], \
            [c["report"].get("notes") for c in mine]
    _bytes_never_grow(mine)
    _assert_like_the_whole_graph(mine, whole)


@pytest.mark.parametrize("mutant", [None, "boundary_rows_of_the_next_rank"])
@pytest.mark.parametrize("tp", [2, 4])
def test_piecewise_boundary_contract_alone_is_exact_and_its_mutant_is_caught(pools, tp, mutant):
    """The boundary contract without the pieces' rewrite (the post-grad pass left out: every piece
    keeps its boundary shard and all-gather, as where a piece's rewrite is refused) still
    computes the eager model at every token count, T=1 included; with the shard offset off by one
    shard (`MUTANTS["boundary_rows_of_the_next_rank"]`: every rank hands the next rank's rows over,
    rows that hold other tokens at TP=2 as at TP=4) the comparison fails at every token count.
    TP=2 in the fast tier, TP=4 in the second (tests/conftest.py HEAVY)."""
    from fxpasses.testing.piecewise import rank_compare_vllm

    pool = pools(tp)
    s = _compile(pool, "piecewise", ["flashcomm1"], mutant=mutant, rewrite_pieces=False)
    assert s[0]["boundaries"]["shard"] is True
    tokens = [1, 5, 9, 23]
    for rank, out in enumerate(pool.run(rank_compare_vllm, s[0]["key"], tokens)):
        assert [r["T"] for r in out["results"]] == tokens
        if mutant is None:
            assert all(r["shape_ok"] and r["rel"] <= REL for r in out["results"]), (rank, out["results"])
        else:
            assert all(r["rel"] > 1e-2 for r in out["results"]), (rank, out["results"])


@settings(max_examples=examples(2))
@given(seed=SEEDS)
def test_piecewise_flashcomm1_with_min_tokens_keeps_boundaries_replicated_tp2(pools, seed):
    """An explicit min_tokens above 1 leaves the ranges below it in the original layout, and a piece's
    boundary shapes are the same in every range: the boundaries stay replicated, the range below is
    left alone, and in the range above every piece ends in replicated tensors, its gathers placed by
    the minimum cut (`fxpasses.gather_points`): the middle piece gathers its residual and the norm's
    input once, before the norm, so each piece moves reduce-scatter + all-gather: exactly the
    all-reduce's bytes."""
    pool = pools(2)
    s = _compile(pool, "piecewise", ["flashcomm1"], min_tokens=9)
    assert s[0]["boundaries"]["shard"] is False and "min_tokens=9" in s[0]["boundaries"]["reason"]
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    mine = calls[0]
    low = [c for c in mine if c["range"] == "(1, 8)"]
    high = [c for c in mine if c["range"] == "(9, 2048)"]
    assert len(high) == 3 and not low  # vLLM does not hand the pass a range below min_tokens
    assert all(c["report"]["graph_mode"]["boundaries"].startswith("replicated: min_tokens=9") for c in high)
    assert all(c["report"]["applied"] for c in high), [c["report"]["reason"] for c in high]
    assert all(c["report"]["bytes_per_step"]["ratio"] == 1 for c in high)
    for c in high:
        assert c["report"]["collectives_after"].get("all_reduce", 0) == 0, c["report"]["collectives_after"]
        assert "boundary_gathers_taken" not in c["report"]


@settings(max_examples=examples(1))  # FlashComm2 per piece at TP=2 in the first tier: test_ascend_route_standin
@given(seed=SEEDS)
def test_piecewise_flashcomm2_per_piece_tp4(pools, seed):
    pool = pools(4)
    s = _compile(pool, "piecewise", ["flashcomm2"], flashcomm2_oproj_tp_size=2)
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    mine = calls[0]
    assert len(mine) == 3 * len(RANGES)
    applied = [c for c in mine if c["report"]["applied"]]
    assert len(applied) == 2 * len(RANGES)   # the two pieces that hold an o_proj
    _bytes_never_grow(mine)
    for c in applied:
        assert c["report"]["collectives_after"].get("all_to_all", 0) == 1, c["report"]["collectives_after"]
        assert c["report"]["bytes_per_step"]["ratio"] < 1


@pytest.mark.parametrize("tp", [2, 4])
@settings(max_examples=examples(2))
@given(seed=SEEDS)
def test_piecewise_flashcomm1_flashcomm2_shards_the_piece_boundaries(pools, seed, tp):
    """FC1+FC2 in pieces: the boundaries carry the sharded residual, FlashComm2's all-to-all
    replaces each o_proj's reduction and nothing is left out; the pieces together equal the
    whole-graph FC1+FC2 rewrite in collectives and bytes."""
    pool = pools(tp)
    whole = _whole_graph_calls(pool, ["flashcomm1", "flashcomm2"])
    s = _compile(pool, "piecewise", ["flashcomm1", "flashcomm2"])
    assert s[0]["boundaries"]["shard"] is True and s[0]["boundaries"]["boundaries"] == 2
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    mine = calls[0]
    _bytes_never_grow(mine)
    assert not any("left_out" in c["report"] for c in mine)
    for r in RANGES:
        assert [c["report"]["collectives_after"].get("all_to_all", 0) for c in mine if c["range"] == r] == [0, 1, 1]
    _assert_like_the_whole_graph(mine, whole)


@settings(max_examples=examples(2))
@given(seed=SEEDS)
def test_whole_graph_flashcomm1_spans_layers_tp4(pools, seed):
    pool = pools(4)
    s = _compile(pool, "whole", ["flashcomm1"])
    assert s[0]["pieces"] == 1
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    mine = calls[0]
    assert len(mine) == len(RANGES)
    for c in mine:
        r = c["report"]
        assert r["graph_mode"]["kind"] == "whole" and r["applied"]
        assert r["collectives_after"].get("all_reduce", 0) == 0 and r["collectives_after"]["reduce_scatter"] == 5, r["collectives_after"]
        assert r["bytes_per_step"]["ratio"] <= 1


# links under which FlashComm1 pays from a few tokens: collectives cost no latency and little per
# byte, token-wise ops stream at 1 MB/s, so the norms on T/tp rows save more than anything costs;
# below tp tokens the padding makes the sharded rows no fewer (and the pad writes more)
CHEAP_LINKS = {"memory_gbps": 0.001, **{k: {"latency_us": 0, "gbps": 1} for k in
                                        ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")}}


@settings(max_examples=examples(3))
@given(seed=SEEDS)
def test_auto_keeps_flashcomm1_in_the_range_where_it_pays_tp4(pools, seed):
    """min_tokens=auto in vLLM's compile ranges: the pass judges each range from its graph at both
    ends and every padding phase. Range [1, 15] reaches T=1 (padded to 4 rows: no row saved, more
    written) and is left as it was, with the modelled times in the report; [16, 2048] is rewritten
    (its worst padding phase, T=17, still saves). Every rank decides alike (rank 0's folded
    vocabulary offset cancels) and every output equals the eager model."""
    pool = pools(4)
    s = _compile(pool, "whole", ["flashcomm1"], [15], min_tokens="auto", link_costs=CHEAP_LINKS)
    calls = _run_all(pool, s[0]["key"], seed, reach=(1, 16))
    _same_on_every_rank(calls)
    by_range = {c["range"]: c["report"] for c in calls[0]}
    assert set(by_range) == {"(1, 15)", "(16, 2048)"}
    low, high = by_range["(1, 15)"], by_range["(16, 2048)"]
    assert not low["applied"] and "min_tokens=auto" in low["reason"], low["reason"]
    assert low["token_gate"]["keeps"] is False and low["token_gate"]["token_range"] == [1, 15]
    assert low["token_gate"]["points"][0]["delta_us"] > 0   # T=1 costs
    assert high["applied"] and high["token_gate"]["keeps"], high.get("reason")
    assert [p["tokens"] for p in high["token_gate"]["points"]] == [16, 17, 18, 19, 2048]
    assert all(p["delta_us"] <= 0 for p in high["token_gate"]["points"])
    assert high["collectives_after"].get("all_reduce", 0) == 0


@settings(max_examples=examples(3))
@given(seed=SEEDS)
def test_auto_leaves_every_range_alone_on_cpu_links_tp2(pools, seed):
    """The default: with this platform's link costs (gloo reduce-scatter / all-gather against the
    shared-memory all-reduce) FlashComm1 is modelled slower in both ranges; nothing is rewritten and
    the report says why, naming the constants."""
    pool = pools(2)
    s = _compile(pool, "whole", ["flashcomm1"], min_tokens="auto", link_costs={"platform": "cpu"})
    calls = _run_all(pool, s[0]["key"], seed)
    _same_on_every_rank(calls)
    for c in calls[0]:
        r = c["report"]
        assert not r["applied"] and "min_tokens=auto" in r["reason"] and "cpu link costs" in r["reason"], r
        assert r["collectives_after"] == r["collectives_before"]
