"""MLP-TP's activation analysis, one handler at a time, on tiny ATen graphs traced in this process:
which ops between gate_up_proj and down_proj can run on a 1/K slice of the intermediate features,
and the edits that re-slice their constants."""
from __future__ import annotations

import sys

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxpasses import graph_forms as gf
from fxpasses.strategies import mlp_activation as ma

I, H, T, K = 8, 16, 5, 2   # intermediate, hidden, tokens, group size


def _analysis(act, h=2):
    """Trace x -> gate_up mm -> act -> down mm; return the Analysis and the result of analyse()."""
    def mlp(x, wgu, wd):
        return torch.mm(act(torch.mm(x, wgu.t())), wd.t())

    gm = make_fx(mlp, tracing_mode="fake")(torch.randn(T, H), torch.randn(h * I, H), torch.randn(H, I))
    mms = [n for n in gm.graph.nodes if gf.op_name(n) == "aten::mm"]
    gu, dn = mms[0], mms[-1]
    a = ma.Analysis(ma.Region(gu, dn, dn.args[0]), T, I, h, K, K * T)
    return a, ma.analyse(a)


def _edits(a):
    return sorted((gf.op_name(n), pos, v if not isinstance(v, list) else tuple(v)) for n, pos, v in a.edits)


def test_gated_slices_are_moved_to_the_sliced_boundaries():
    a, why = _analysis(lambda gu: torch.nn.functional.silu(gu[:, :I]) * gu[:, I:])
    assert why is None
    # [:, :I] -> [:, :I/K]; [:, I:] -> [:, I/K:] (the open end stays open)
    assert _edits(a) == [("aten::slice", 2, 0), ("aten::slice", 2, I // K), ("aten::slice", 3, I // K),
                         ("aten::slice", 3, sys.maxsize)]


def test_views_get_k_times_the_tokens_and_sliced_features():
    a, why = _analysis(lambda gu: torch.relu(gu.view(T, I)), h=1)
    assert why is None
    assert _edits(a) == [("aten::view", 1, (K * T, I // K))]
    a, why = _analysis(lambda gu: torch.relu(gu.view(T * 2, I // 2)).view(T, I), h=1)
    assert why is not None and "not the token count" in why


def test_splits_at_gate_up_boundaries_only():
    a, why = _analysis(lambda gu: (lambda g, u: g * torch.sigmoid(g) * u)(*gu.split([I, I], dim=-1)))
    assert why is None
    assert ("aten::split_with_sizes", 1, (I // K, I // K)) in _edits(a)
    a, why = _analysis(lambda gu: (lambda g, u: torch.cat([u, g], -1)[:, :I])(*gu.split([I + 2, I - 2], dim=-1)))
    assert why is not None and "not at gate/up boundaries" in why


def test_slices_off_a_boundary_or_strided_are_refused():
    _, why = _analysis(lambda gu: torch.cat([gu[:, :5], gu[:, 5:]], 1), h=1)
    assert why is not None and "not at a gate/up boundary" in why
    _, why = _analysis(lambda gu: torch.cat([gu[:, ::2], gu[:, 1::2]], 1), h=1)
    assert why is not None and "strided" in why


def test_pointwise_may_not_mix_in_an_outside_tensor():
    def mlp(x, wgu, wd, z):
        return torch.mm(torch.mm(x, wgu.t()) * z, wd.t())

    gm = make_fx(mlp, tracing_mode="fake")(torch.randn(T, H), torch.randn(I, H), torch.randn(H, I),
                                           torch.randn(T, I))
    mms = [n for n in gm.graph.nodes if gf.op_name(n) == "aten::mm"]
    a = ma.Analysis(ma.Region(mms[0], mms[-1], mms[-1].args[0]), T, I, 1, K, K * T)
    why = ma.analyse(a)
    assert why is not None and "mixes in tensor" in why


def test_an_unknown_op_between_the_matmuls_is_refused():
    _, why = _analysis(lambda gu: torch.cumsum(gu, -1), h=1)
    assert why is not None and "cannot be re-sliced" in why


def test_the_table_maps_op_names_to_handlers():
    assert ma.HANDLERS["aten::slice"] is ma.feature_slice
    assert ma.HANDLERS["aten::split_with_sizes"] is ma.feature_split
    assert ma.HANDLERS["aten::view"] is ma.view
    assert ma.HANDLERS["aten::chunk"] is ma.feature_chunk
