"""`fxpasses.piece_boundaries` in isolation: the decision, the shard op against its definition, the
choice of boundary values on real Dynamo graphs (in-place writes, splitting-op readers), and the seam
on the installed vLLM. The compiled behaviour (pieces at TP=2/4, vllm-ascend's route, the CPU engine)
is in tests/test_piecewise_vllm_compile.py, tests/test_ascend_route_standin.py and
tests/test_vllm_engine_piecewise.py."""
from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxpasses import piece_boundaries as pb
from fxpasses import split_seam
from fxpasses.config import FxPassesConfig
from helpers import examples

CHEAP_LINKS = {"memory_gbps": 0.001, **{k: {"latency_us": 0, "gbps": 1} for k in
                                        ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")}}

# collectives that cost nothing at all: the layout is no slower at any size, T=1 included
FREE_LINKS = {"memory_gbps": 0.001, **{k: {"latency_us": 0, "gbps": 1e12} for k in
                                       ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")}}


def _decide(tp=2, **cfg):
    return pb.boundary_decision(FxPassesConfig.from_dict({"strategies": ["flashcomm1"], **cfg}), tp,
                                max_tokens=2048, hidden=4096, dtype_bytes=2)


def test_decision_follows_min_tokens_and_the_cost_model():
    assert _decide(min_tokens=0).shard and _decide(min_tokens=1).shard
    d = _decide(min_tokens=2)
    assert not d.shard and "min_tokens=2" in d.reason and "every range" in d.reason
    assert not _decide(tp=1, min_tokens=0).shard
    assert not pb.boundary_decision(FxPassesConfig.from_dict({"strategies": ["flashcomm2"], "min_tokens": 0}), 4,
                                    max_tokens=2048, hidden=4096, dtype_bytes=2).shard
    # auto: the decode sizes decide, because boundary shapes are the same in every compile range
    cpu = _decide(min_tokens="auto", link_costs={"platform": "cpu"})
    assert not cpu.shard and "decode sizes" in cpu.reason and "cpu" in cpu.reason
    # even free collectives do not pay at T=1: padded to tp rows, every rank still norms one row,
    # and the layout sends more bytes than the all-reduces
    cheap = _decide(min_tokens="auto", link_costs=CHEAP_LINKS)
    assert not cheap.shard and "from 2 tokens only" in cheap.reason, cheap.reason
    free = _decide(min_tokens="auto", link_costs=FREE_LINKS)
    assert free.shard and "from 1 to 2048 tokens" in free.reason, free.reason
    unknown = pb.boundary_decision(FxPassesConfig.from_dict({"strategies": ["flashcomm1"]}), 2, max_tokens=None,
                                   hidden=4096, dtype_bytes=2)
    assert not unknown.shard and "unknown" in unknown.reason


@pytest.mark.parametrize("n", [2, 3, 4])
@settings(max_examples=examples(10), deadline=None)
@given(T=st.integers(1, 37))
def test_boundary_shards_concatenate_to_the_padded_value(n, T):
    """The n ranks' shards, in rank order, are the value with zero rows appended up to n * ceil(T/n):
    what an all-gather over the group returns, so its first T rows are the value."""
    x = torch.randn(T, 3, dtype=torch.float64)
    shards = [torch.ops.fxpasses.boundary_shard(x, r, n) for r in range(n)]
    rows = -(-T // n)
    assert all(s.shape == (rows, 3) for s in shards)
    whole = torch.cat(shards)
    assert torch.equal(whole[:T], x) and not whole[T:].any()


def _traced(fn, *args):
    """A Dynamo graph of `fn` (dim 0 of the first input dynamic), with its example values."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(args[0], 0)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def _split_at_sigmoid(node):
    return node.op == "call_function" and node.target is torch.sigmoid


def test_boundary_values_are_the_residual_only():
    """A residual made before a splitting op and read after it crosses sharded; the splitting op's
    own input (attention needs every token), a value read only in its own piece and a value the
    later piece writes to while a third piece still reads it stay replicated."""
    def model(x, w):
        r = x @ w             # piece 0
        h = r * 2             # read by the splitting op only
        a = torch.sigmoid(h)  # the splitting op (piece 1)
        y = a + r             # piece 2 reads r
        q = y * 3             # read by the splitting op only
        z = torch.sigmoid(q)  # piece 3
        return z + y          # piece 4 reads y (made in piece 2); the output leaves the model

    gm = _traced(model, torch.randn(6, 4), torch.randn(4, 4))
    T = pb.token_count_of(gm.graph)
    found = {b.value.name: sorted(b.later) for b in pb.boundary_values(gm.graph, _split_at_sigmoid, T)}
    assert set(found) == {"r", "y"}, found
    assert found["r"] == [2] and found["y"] == [4]


def _written_in_its_own_piece(x, w):
    r = x @ w
    r.add_(1.0)               # after the point where the shard would be taken
    a = torch.sigmoid(r * 2)
    return a + r


def _written_in_one_later_piece_read_in_another(x, w):
    r = x @ w
    a = torch.sigmoid(r * 2)
    r.add_(1.0)               # piece 2 writes ...
    b = torch.sigmoid(a)
    return b + r              # ... and piece 4 must see it


@pytest.mark.parametrize("model", [_written_in_its_own_piece, _written_in_one_later_piece_read_in_another])
def test_a_value_written_where_another_piece_could_see_it_stays_replicated(model):
    gm = _traced(model, torch.randn(6, 4), torch.randn(4, 4))
    T = pb.token_count_of(gm.graph)
    assert [b.value.name for b in pb.boundary_values(gm.graph, _split_at_sigmoid, T)] == [], gm.graph


def test_a_value_written_only_in_the_one_piece_that_reads_it_crosses():
    """vLLM's fused add + norm may write its residual input in place: the piece reading it gets its
    own copy of the gathered rows (`shard_boundaries` clones them)."""
    def model(x, w):
        r = x @ w
        a = torch.sigmoid(r * 2)
        r.add_(a)
        return r * 3

    gm = _traced(model, torch.randn(6, 4), torch.randn(4, 4))
    T = pb.token_count_of(gm.graph)
    (b,) = pb.boundary_values(gm.graph, _split_at_sigmoid, T)
    assert b.value.name == "r" and b.written


def test_written_args_reads_schemas_methods_and_operators():
    g = torch.fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    m = g.call_method("add_", (x, y))
    f = g.call_function(torch.ops.aten.add_.Tensor, (y, x))
    s = g.call_function(operator.setitem, (x, 0, y))
    pure = g.call_function(torch.ops.aten.add.Tensor, (x, y))
    assert pb._written_args(m) == [x] and pb._written_args(f) == [y] and pb._written_args(s) == [x]
    assert pb._written_args(pure) == []


def test_the_seam_matches_this_vllm_and_installs_once():
    pytest.importorskip("vllm")
    from vllm.compilation import backends

    assert split_seam.seam_problem() is None
    original = backends.split_graph
    try:
        assert split_seam.install() and split_seam.install()
        assert backends.split_graph is split_seam.split_graph_with_boundaries
        assert backends.split_graph.__wrapped__ is (getattr(original, "__wrapped__", None) or original)
    finally:
        backends.split_graph = original
