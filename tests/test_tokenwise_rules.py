"""Each token-wise rule alone, on a tiny symbolic ATen graph traced in this process (no ranks):
the rule table says which inputs are token-aligned, or None when the op is not token-wise."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxpasses import graph_forms as gf
from fxpasses import tokenwise as tw

aten = torch.ops.aten


def _trace(fn, *shapes):
    gm = make_fx(fn, tracing_mode="symbolic")(*[torch.randn(*s) for s in shapes])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    T = gf.val(x).shape[0]

    def is_token(n):
        v = gf.val(n)
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and gf.same_size(v.shape[0], T)

    nodes = {n.name: n for n in gm.graph.nodes}
    return nodes, is_token


def _aligned(fn, name, *shapes):
    nodes, is_token = _trace(fn, *shapes)
    node = nodes[name] if "::" not in name else next(n for n in nodes.values() if gf.op_name(n) == name)
    got = tw.token_aligned_args(node, is_token)
    return None if got is None else sorted(a.name for a in got)


def test_matmul_against_a_weight_keeps_rows_but_not_against_tokens():
    assert _aligned(lambda x, w: torch.mm(x, w.t()), "mm", (5, 16), (8, 16)) == ["x_1"]
    # x.T @ x mixes tokens: the right operand has no token dim 0 but the left one is transposed
    assert _aligned(lambda x: torch.mm(x.t(), x), "mm", (5, 16)) is None
    assert _aligned(lambda x, y: torch.mm(x, y), "mm", (5, 5), (5, 3)) is None  # y is token-major


def test_addmm_bias_is_aligned_only_when_token_major():
    assert _aligned(lambda x, w, b: torch.addmm(b, x, w.t()), "addmm", (5, 16), (8, 16), (8,)) == ["x_1"]
    assert _aligned(lambda x, w, b: torch.addmm(b, x, w.t()), "addmm", (5, 16), (8, 16), (5, 8)) == ["b_1", "x_1"]


def test_views_keep_rows_only_when_dim0_stays_the_token_count():
    assert _aligned(lambda x: x.view(-1, 2, 8), "view", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: x.view(-1), "view", (5, 16)) is None


def test_permute_transpose_and_cat_depend_on_the_dimension():
    assert _aligned(lambda x: x.view(-1, 2, 8).permute(0, 2, 1), "permute", (5, 16)) == ["view"]
    assert _aligned(lambda x: x.permute(1, 0), "permute", (5, 16)) is None
    assert _aligned(lambda x: x.view(-1, 2, 8).transpose(1, 2), "transpose", (5, 16)) == ["view"]
    assert _aligned(lambda x: torch.cat([x, x * 2], 1), "cat", (5, 16)) == ["mul", "x_1"]
    assert _aligned(lambda x: torch.cat([x, x], 0), "cat", (5, 16)) is None


def test_reductions_and_dim_ops_only_off_the_token_dim():
    assert _aligned(lambda x: x.sum(-1), "sum_1", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: x.sum(0), "sum_1", (5, 16)) is None
    assert _aligned(lambda x: torch.cumsum(x, 0), "cumsum", (5, 16)) is None
    assert _aligned(lambda x: torch.cumsum(x, 1), "cumsum", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: x.narrow(1, 0, 4), "aten::slice", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: x.narrow(0, 0, 4), "aten::slice", (5, 16)) is None
    assert _aligned(lambda x: x.unsqueeze(1), "aten::unsqueeze", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: x.unsqueeze(0), "aten::unsqueeze", (5, 16)) is None


def test_pointwise_respects_broadcasting():
    assert _aligned(lambda x, b: x + b, "add", (5, 16), (16,)) == ["x_1"]
    assert _aligned(lambda x, y: x * y, "mul", (5, 16), (5, 16)) == ["x_1", "y_1"]
    # a [T] vector broadcast along the features puts the token dim in the last position
    assert _aligned(lambda x, v: x.view(-1, 5) + v, "add", (5, 5), (5,)) is None


def test_unknown_ops_are_not_tokenwise():
    nodes, is_token = _trace(lambda x: torch.kthvalue(x, 2, 1)[0], (5, 16))
    kth = next(n for n in nodes.values() if gf.op_name(n) == "aten::kthvalue")
    assert tw.rule_for(kth) is None
    assert tw.token_aligned_args(kth, is_token) is None


def test_topk_and_sort_are_tokenwise_along_features_only():
    # the MoE router's top-k over experts keeps rows; top-k or sort over tokens does not
    assert _aligned(lambda x: torch.topk(x, 2)[0], "aten::topk", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: torch.topk(x, 2, dim=0)[0], "aten::topk", (5, 16)) is None
    assert _aligned(lambda x: torch.sort(x, -1)[0], "aten::sort", (5, 16)) == ["x_1"]
    assert _aligned(lambda x: torch.sort(x, 0)[0], "aten::sort", (5, 16)) is None


@pytest.mark.parametrize("name,rule", [("aten::view", tw.view), ("aten::mm", tw.mm), ("aten::cat", tw.cat),
                                       ("aten::sum", tw.reduction), ("aten::clone", tw.pointwise),
                                       ("aten::embedding", tw.embedding)])
def test_the_table_maps_op_names_to_rules(name, rule):
    assert tw.RULES[name] is rule


def _aligned_b1(fn, name, *shapes):
    """As `_aligned`, for a [1, T, ...] first input: the token dim is dim 1 (`token_dim_of`)."""
    gm = make_fx(fn, tracing_mode="symbolic")(*[torch.randn(*s) for s in shapes])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    T = gf.val(x).shape[1]

    def tdim(n):
        return tw.token_dim_of(gf.val(n), T)

    node = next(n for n in gm.graph.nodes if gf.op_name(n) == f"aten::{name}")
    got = tw.token_aligned_args(node, lambda n: tdim(n) is not None, tdim=tdim)
    return None if got is None else sorted(a.name for a in got)


def test_the_token_dim_is_the_first_size_t_dim_behind_size_one_dims():
    T = 5  # a static count is enough for the shape rule itself
    assert tw.token_dim_of(torch.empty(5, 3), T) == 0
    assert tw.token_dim_of(torch.empty(1, 5, 3), T) == 1
    assert tw.token_dim_of(torch.empty(1, 1, 5, 3), T) == 2
    assert tw.token_dim_of(torch.empty(1, 2, 5, 3), T) is None   # heads before tokens: not a row layout
    assert tw.token_dim_of(torch.empty(3, 5), T) is None
    assert tw.token_dim_of([torch.empty(1, 5, 1), torch.empty(1, 5, 1)], T) == 1


def test_rules_read_the_token_dim_of_a_batch_of_one_layout():
    shape = (1, 7, 16)
    assert _aligned_b1(lambda x: x * 2 + 1, "mul", shape) == ["x_1"]
    assert _aligned_b1(lambda x: x.reshape(-1, 16), "view", shape) == ["x_1"]
    assert _aligned_b1(lambda x: x.reshape(-1), "view", shape) is None
    assert _aligned_b1(lambda x: x.transpose(0, 1), "transpose", shape) == ["x_1"]   # [T, 1, H]
    assert _aligned_b1(lambda x: x.transpose(1, 2), "transpose", shape) is None      # [1, H, T]
    assert _aligned_b1(lambda x: x.permute(1, 0, 2), "permute", shape) == ["x_1"]
    assert _aligned_b1(lambda x: x.squeeze(0), "squeeze", shape) == ["x_1"]
    assert _aligned_b1(lambda x: x.unsqueeze(0), "unsqueeze", shape) == ["x_1"]      # [1, 1, T, H]
    assert _aligned_b1(lambda x: x.sum(2), "sum", shape) == ["x_1"]
    assert _aligned_b1(lambda x: x.sum(1), "sum", shape) is None                     # over tokens
    assert _aligned_b1(lambda x: torch.cat([x, x], 2), "cat", shape) == ["x_1", "x_1"]
    assert _aligned_b1(lambda x: torch.cat([x, x], 1), "cat", shape) is None
    # F.linear on [1, T, H] traces as view [T, H] -> mm -> view [1, T, O]: tokens on dim 0 of the mm
    assert _aligned_b1(lambda x, w: torch.nn.functional.linear(x, w), "mm", shape, (8, 16)) == ["view"]
    assert _aligned_b1(lambda x, w: torch.nn.functional.linear(x, w), "_unsafe_view", shape, (8, 16)) == ["mm"]
    assert _aligned_b1(lambda x: x[:, 1:], "slice", shape) is None                   # slices tokens
