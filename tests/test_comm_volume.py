"""The byte counter of fxpasses.comm_volume against hand-computed values on tiny hand-built graphs."""
from __future__ import annotations


import pytest
import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fxpasses import comm_volume as cv

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
G = "g0"


class Builder:
    def __init__(self, symbolic: bool):
        self.mode = FakeTensorMode(shape_env=ShapeEnv() if symbolic else None)
        self.g = fx.Graph()
        x = torch.zeros(8, 8, dtype=torch.float32)
        if symbolic:
            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC],
                                           constraint_sizes=[None, None])
            fx_ = self.mode.from_tensor(x, symbolic_context=ctx)
        else:
            fx_ = self.mode.from_tensor(x)
        self.x = self.g.placeholder("x")
        self.x.meta["val"] = fx_
        self.T = fx_.shape[0]

    def __call__(self, target, *args, layer=None, meta=None):
        vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
        with self.mode:
            out = target(*vals)
        n = self.g.call_function(target, args)
        n.meta["val"] = out
        if layer is not None:
            n.meta["nn_module_stack"] = {"k": (f"L['self'].layers[{layer}].self_attn.o_proj", "RowParallelLinear")}
        if meta:
            n.meta["fxpasses"] = meta
        return n


def _graph(symbolic: bool):
    """x[T, 8] f32 -> all_reduce(g, size 4) -> reduce_scatter(4) -> all_gather(4) -> all_to_all(2)."""
    b = Builder(symbolic)
    h = b(aten.mul.Tensor, b.x, 2.0, layer=0)
    ar = b(c10d.all_reduce_.default, h, "sum", G, layer=0)
    w = b(c10d.wait_tensor.default, ar, layer=0)
    y = b(aten.add.Tensor, w, 1.0, layer=1)
    rs = b(c10d.reduce_scatter_tensor.default, y, "sum", 4, G)
    rs = b(c10d.wait_tensor.default, rs)
    ag = b(c10d.all_gather_into_tensor.default, rs, 4, G)
    ag = b(c10d.wait_tensor.default, ag)
    a2a = b(c10d.all_to_all_single.default, ag, [3, 3], [3, 3], "odp", meta={"group_size": 2})
    a2a = b(c10d.wait_tensor.default, a2a)
    b.g.output((a2a,))
    return b


def test_static_bytes_match_hand_computed():
    b = _graph(symbolic=False)
    vols = cv.collective_volumes(b.g, group_sizes={G: 4})
    assert [v.kind for v in vols] == ["all_reduce", "reduce_scatter", "all_gather", "all_to_all"]
    full = 8 * 8 * 4  # bytes of the [8, 8] f32 tensor
    got = {v.kind: (v.send_bytes, v.recv_bytes, v.group_size) for v in vols}
    assert got["all_reduce"] == (2 * 3 * full // 4, 2 * 3 * full // 4, 4)       # 2(n-1)/n B = 384
    assert got["reduce_scatter"] == (3 * full // 4,) * 2 + (4,)                    # (n-1)/n B = 192
    assert got["all_gather"] == (3 * full // 4,) * 2 + (4,)                        # output is the full [8, 8]
    assert got["all_to_all"] == (full // 2,) * 2 + (2,)                            # n = 2 from the tag
    assert [v.layer for v in vols] == ["0", "1", "1", "1"]
    assert cv.totals(vols, {})["per_step_send"] == 384 + 192 + 192 + 128


def test_symbolic_bytes_are_expressions_in_the_token_count():
    b = _graph(symbolic=True)
    vols = cv.collective_volumes(b.g, group_sizes={G: 4})
    (s,) = cv.token_symbols(b.g)
    ar = vols[0]
    assert sympy.simplify(ar.send_bytes - sympy.Rational(3, 2) * 32 * s) == 0  # 2*3/4 * (s*8*4)
    for T in (1, 6, 1000):
        assert cv.evaluate(ar.send_bytes, {s: T}) == 48 * T
        assert cv.evaluate(vols[1].send_bytes, {s: T}) == 24 * T
    per = cv.per_layer(vols, {s: 12})
    # T=12: rs 3/4 of 12*8*4, ag 3/4 of its [4 * 12//4, 8] output, a2a 1/2 of that
    assert per["0"]["all_reduce"] == 576 and per["1"]["total"] == 288 + 288 + 192
    # T=10 is not a multiple of 4 and this hand graph has no pad: the graph's floor division shows
    per = cv.per_layer(vols, {s: 10})
    assert per["1"]["all_gather"] == 3 * (4 * (10 // 4) * 8 * 4) // 4


def test_group_size_must_be_known():
    b = _graph(symbolic=False)
    with pytest.raises(ValueError, match="group size"):
        cv.collective_volumes(b.g)


def test_padded_reduce_scatter_counts_the_pad_rows():
    """pad T=5 rows to 8 for n=4: the reduce_scatter moves 3/4 of the padded tensor."""
    b = Builder(symbolic=False)
    sl = b(aten.slice.Tensor, b.x, 0, 0, 5)
    p = b(aten.constant_pad_nd.default, sl, [0, 0, 0, 3], 0.0)
    rs = b(c10d.reduce_scatter_tensor.default, p, "sum", 4, G)
    b.g.output((b(c10d.wait_tensor.default, rs),))
    (v,) = cv.collective_volumes(b.g)
    assert v.send_bytes == 3 * (8 * 8 * 4) // 4
    assert cv.analytic_layer_bytes("flashcomm1", T=5, tp=4, hidden=8, attn_out=8, dtype_bytes=4)["total"] \
        == 4 * v.send_bytes


def test_analytic_vanilla_equals_flashcomm1_when_tokens_divide():
    for tp in (2, 8):
        a = cv.analytic_layer_bytes("vanilla", T=64, tp=tp, hidden=16, attn_out=16, dtype_bytes=2)
        f = cv.analytic_layer_bytes("flashcomm1", T=64, tp=tp, hidden=16, attn_out=16, dtype_bytes=2)
        assert a["total"] == f["total"]
