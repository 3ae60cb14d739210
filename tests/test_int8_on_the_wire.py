"""int8 on the wire (W8A8): where a linear layer's input is quantised in the graph, the collective
that feeds the layer sends the int8 values (+ per-token float32 scales for dynamic W8A8) instead of
the float input. Through the NPU stand-ins (vllm-ascend's `vllm.quantize`, `npu.npu_dynamic_quant`,
`npu.npu_quant_matmul`; `fxpasses.testing.npu_standin`) and the NPU-form decoder
(`fxpasses.testing.models.npu_tiny`, W8A8 static and dynamic), at TP=2 and TP=4 over gloo.

* FlashComm1's column all-gathers (qkv_proj, gate_up_proj): the quantisation is token-wise, so it
  runs on the token shards and the int8 output is gathered (dynamic: the float32 per-token scales
  as 4 more int8 columns of the same gather); `int8_comm: off` gathers the float
  input and quantises after. Quantise-then-gather equals gather-then-quantise bit for bit, so the
  two rewritten graphs agree exactly (max abs difference 0.0), and both equal the original graph
  (float64: rel <= 1e-10, the order of the reduce-scatter's additions).
* FlashComm2's o_proj all_to_all: the graph's own quantisation of the o_proj input (per-tensor
  static, or per token over this rank's D/tp features) stays where it is and its int8 output
  (+ scales, as 4 more int8 columns) is exchanged; each received chunk is multiplied by its peer's int8 weight shard and
  dequantised with its peer's scales. The quantisation is the original graph's, value for value,
  so the quantisation error of int8 communication against the float communication of the
  original graph (its all-reduce of the o_proj output) is zero; what remains is float64 rounding
  of a reordered sum: rel <= 1e-10. A wrong chunk, scale or peer is off by O(1) (>= 1e-2).
  `int8_comm: off` leaves such a site to FlashComm1 (float reduce-scatter) with the reason.

Bytes (`fxpasses.comm_volume`, at 4096 x tp tokens): every all-gather / all_to_all that feeds a
quantised linear sends int8, 1 byte per element, plus 4 bytes per token and chunk for a dynamic
scale, against 2 bytes per element in bf16: static exactly 1/2, dynamic (w + 4) / (2 w) for a row
of w int8 values (FlashComm1: w = H = 64 -> 17/32; FlashComm2: w = D/tp -> 9/16 at TP=2, 5/8 at
TP=4). Measured on bf16 captures of the same decoder at TP=2 (the ratios at TP=4 follow from w)."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from fxpasses.testing import npu_standin
from fxpasses.commands.tp_run.harness import graph_args, rank_capture, rank_compare
from helpers import bundled_spec

BUILDER = "fxpasses.testing.models.npu_tiny:build_npu_decoder"
H, D = 64, 64   # the bundled spec: hidden 64, 4 heads x 16


@pytest.fixture(scope="module", autouse=True)
def standin_ops():
    npu_standin.ensure_npu_standin_ops()


def rank_collectives(state, key):
    """(kind, input dtype, per-step send bytes at 4096 x n tokens, site) of each per-step collective
    of the rewritten graph on this rank."""
    from fxpasses import comm_volume
    from fxpasses import graph_forms as gf

    gm = state["captures"][key]["cap"].graphs[0]
    g = gm.graph
    syms = comm_volume.token_symbols(g)
    vols = {v.node: v for v in comm_volume.collective_volumes(g, default_group_size=1)}
    out = []
    for node in g.nodes:
        v = vols.get(node.name)
        if v is None or v.one_time:
            continue
        subs = {s: 4096 * v.group_size for s in syms}
        x = gf.val(gf.collective_input(node))
        out.append((v.kind, str(x.dtype).removeprefix("torch."), v.at(subs)["send"], v.site, _to_output(node)))
    return out


def _to_output(node, hops=4):
    """The collective's result reaches the graph output through views / waits / slices only."""
    frontier = [node]
    for _ in range(hops):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "output":
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def rank_compare_two(state, key_a, key_b, token_counts):
    """Max abs difference between the rewritten graphs of two captures (same weights, same inputs)."""
    res = []
    with torch.no_grad():
        for T in token_counts:
            cap_a, args_a = graph_args(state, key_a, T)
            cap_b, args_b = graph_args(state, key_b, T)
            a, b = cap_a.graphs[0](*list(args_a))[0], cap_b.graphs[0](*list(args_b))[0]
            res.append({"T": T, "shape_ok": a.shape == b.shape,
                        "max_abs": (a.double() - b.double()).abs().max().item()})
    return res


def _capture(pools, tp, quant, strategies, dtype="float64", **cfg):
    pool = pools.get(tp, "vllm")
    config = {"strategies": list(strategies), **cfg}
    return pool, pool.run(rank_capture, bundled_spec(num_hidden_layers=2), config, dtype, False, builder=BUILDER,
                          builder_kwargs={"quant": quant})


def _tokens(tp):
    return sorted({1, 2, tp - 1, tp, tp + 1, 7, 3 * tp + 1, 64, 129})


def _check_matches_original(pool, summaries, tp, rel=1e-10):
    tokens = _tokens(tp)
    for rank, results in enumerate(pool.run(rank_compare, summaries[0]["key"], tokens)):
        assert [r["T"] for r in results] == tokens
        for r in results:
            assert r["shape_ok"] and r["rel"] <= rel, (rank, r)


def _sites(summary):
    return {x["prefix"]: x for x in summary["report"]["sites"]}


# ---- FlashComm1: the column all-gathers ---------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("quant", ["w8a8", "w8a8_dynamic"])
def test_fc1_gathers_int8_and_equals_float_gather_standin(pools, tp, quant):
    """Every column layer's gather sends int8 (+ float32 per-token scales, dynamic); the result is
    bit for bit the `int8_comm: off` graph's (gather the float input, quantise after), and equal
    to the original graph (rel <= 1e-10)."""
    pool, on = _capture(pools, tp, quant, ("flashcomm1",))
    _, off = _capture(pools, tp, quant, ("flashcomm1",), int8_comm="off")
    _check_matches_original(pool, on, tp)
    _check_matches_original(pool, off, tp)
    for rank, results in enumerate(pool.run(rank_compare_two, on[0]["key"], off[0]["key"], _tokens(tp))):
        for r in results:
            assert r["shape_ok"] and r["max_abs"] == 0.0, (rank, r)
    for key, want in ((on[0]["key"], "int8"), (off[0]["key"], "float64")):
        for colls in pool.run(rank_collectives, key):
            gathers = [c for c in colls if c[0] == "all_gather" and not c[4]]
            # 2 layers x (qkv_proj, gate_up_proj); dynamic: the scales ride in the same gather
            dtypes = sorted(c[1] for c in gathers)
            if want == "int8":
                assert dtypes == ["int8"] * 4, colls
            else:
                assert dtypes == ["float64"] * 4, colls
            assert len([c for c in colls if c[0] == "all_gather"]) == len(gathers) + 1  # + the graph output
    for s in on + off:
        assert s["report"]["collectives_after"]["all_gather"] == 5


# ---- FlashComm2: the o_proj all_to_all ----------------------------------------------------------

# id: (tp, K, quant). Both schemes at TP=2; at TP=4 the dynamic scheme (int8 + scales) with K=2 (the
# OTP group inside the all-to-all); FlashComm2 K=1 at TP=4 on float layers: test_flashcomm2's FC1+FC2
FC2_INT8 = {"w8a8-tp2": (2, 1, "w8a8"), "w8a8_dynamic-tp2": (2, 1, "w8a8_dynamic"),
            "w8a8_dynamic-tp4-K2": (4, 2, "w8a8_dynamic")}


@pytest.mark.parametrize("tp,k,quant", list(FC2_INT8.values()), ids=list(FC2_INT8))
def test_fc2_all_to_all_sends_int8_standin(pools, tp, k, quant):
    """FlashComm2 on a W8A8 o_proj exchanges the int8 input (+ its per-token scales): equal to the
    original graph, whose o_proj output is all-reduced in float, within float64 rounding (rel <=
    1e-10; the quantisation is the same, so its error adds nothing). `int8_comm: off` leaves the
    o_proj to FlashComm1 with that reason, and equals the original too."""
    cfg = dict(weight_format="nd", flashcomm2_oproj_tp_size=k)
    pool, on = _capture(pools, tp, quant, ("flashcomm1", "flashcomm2"), **cfg)
    _check_matches_original(pool, on, tp)
    for s in on:
        for prefix, x in _sites(s).items():
            if prefix.endswith("o_proj"):
                assert x["strategy"] == "flashcomm2" and x["status"] == "rewritten", x
                assert "int8 on the wire" in x["reason"], x
    for colls in pool.run(rank_collectives, on[0]["key"]):
        a2a = [c for c in colls if c[0] == "all_to_all"]
        assert [c[1] for c in a2a] == ["int8"] * 2, colls   # dynamic: the scales ride along
        assert all(c[3].endswith("o_proj") for c in a2a), colls
    _, off = _capture(pools, tp, quant, ("flashcomm1", "flashcomm2"), int8_comm="off", **cfg)
    _check_matches_original(pool, off, tp)
    for s in off:
        for prefix, x in _sites(s).items():
            if prefix.endswith("o_proj"):
                assert x["strategy"] == "flashcomm1" and "int8_comm='off'" in x["reason"], x
        assert s["report"]["collectives_after"]["all_to_all"] == 0


def test_fc2_int8_with_row_bias_standin(pools):
    """The o_proj row bias (TP rank 0's graph only) rides in the one-time block gather: dynamic W8A8
    with a float bias at TP=4, K=2 equals the original graph."""
    pool = pools.get(4, "vllm")
    config = {"strategies": ["flashcomm1", "flashcomm2"], "weight_format": "nd", "flashcomm2_oproj_tp_size": 2}
    summaries = pool.run(rank_capture, bundled_spec(num_hidden_layers=2, o_proj_bias=True), config, "float64",
                         False, builder=BUILDER, builder_kwargs={"quant": "w8a8_dynamic"})
    assert "bias" in summaries[0]["before"]
    _check_matches_original(pool, summaries, 4)
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1


# ---- bytes against bf16 -------------------------------------------------------------------------

def _sum(colls, kind, sites=None):
    """Send bytes of the collectives of `kind` that feed a layer (not the graph output), or whose
    site ends with one of `sites`."""
    return sum(c[2] for c in colls if c[0] == kind and not c[4] and (sites is None or c[3].endswith(sites)))


@pytest.mark.parametrize("tp", [2])  # the ratio to bf16 does not depend on tp; TP=4 int8: the tests above
@pytest.mark.parametrize("quant", ["w8a8", "w8a8_dynamic"])
def test_int8_bytes_against_bf16_standin(pools, tp, quant):
    """bf16 decoder: the column gathers (FlashComm1) and the o_proj all_to_all (FlashComm2) send
    int8 (+ float32 per-token scales): static 1/2 the bytes of the same collective in bf16
    (FlashComm1 with int8_comm off; FlashComm2 on the unquantised decoder), dynamic (w + 4) / (2 w)."""
    dyn = quant == "w8a8_dynamic"
    pool, fc1 = _capture(pools, tp, quant, ("flashcomm1",), dtype="bfloat16")
    _, fc1_off = _capture(pools, tp, quant, ("flashcomm1",), dtype="bfloat16", int8_comm="off")
    on, off = (pool.run(rank_collectives, s[0]["key"])[0] for s in (fc1, fc1_off))
    assert {c[1] for c in off if c[0] == "all_gather"} == {"bfloat16"}
    ratio = Fraction(_sum(on, "all_gather")) / Fraction(_sum(off, "all_gather"))
    assert ratio == (Fraction(H + 4, 2 * H) if dyn else Fraction(1, 2)), (ratio, on, off)
    fc1_rep = fc1[0]["report"]["bytes_per_step"]
    assert fc1_rep["after"] < fc1_off[0]["report"]["bytes_per_step"]["after"]

    cfg = dict(weight_format="nd")
    _, fc2 = _capture(pools, tp, quant, ("flashcomm1", "flashcomm2"), dtype="bfloat16", **cfg)
    _, fc2_float = _capture(pools, tp, "none", ("flashcomm1", "flashcomm2"), dtype="bfloat16", **cfg)
    on, flt = (pool.run(rank_collectives, s[0]["key"])[0] for s in (fc2, fc2_float))
    assert {c[1] for c in flt if c[0] == "all_to_all"} == {"bfloat16"}
    w = D // tp
    ratio = Fraction(_sum(on, "all_to_all", ("o_proj",))) / Fraction(_sum(flt, "all_to_all", ("o_proj",)))
    assert ratio == (Fraction(w + 4, 2 * w) if dyn else Fraction(1, 2)), (ratio, on, flt)


# ---- which ops quantise (one process) -----------------------------------------------------------

def test_quantize_ops_are_known_and_token_wise():
    """vllm-ascend's quantisation ops (records with `quantizes`) and vLLM's `_C` int8 ones are
    quantisations, token-wise in their activation (and the dynamic scale they write)."""
    import torch.fx as fx
    import vllm._custom_ops  # noqa: F401  (vLLM's _C ops)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxpasses import tokenwise as tw

    T, Hd = 5, 8
    with FakeTensorMode() as mode:
        vals = {"out": torch.empty(T, Hd, dtype=torch.int8), "x": torch.empty(T, Hd),
                "scale": torch.empty(T, 1), "s1": torch.empty(1), "sc": torch.empty(Hd), "w": torch.empty(Hd, Hd)}
    del mode
    g = fx.Graph()
    ph = {}
    for k, v in vals.items():
        ph[k] = g.placeholder(k)
        ph[k].meta["val"] = v

    def is_token(n):
        v = n.meta.get("val")
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == T

    dyn = g.call_function(torch.ops._C.dynamic_scaled_int8_quant.default, (ph["out"], ph["x"], ph["scale"], None))
    sta = g.call_function(torch.ops._C.static_scaled_int8_quant.default, (ph["out"], ph["x"], ph["s1"], None))
    npu_s = g.call_function(torch.ops.vllm.quantize.default, (ph["x"], ph["sc"], ph["sc"], ph["sc"]))
    npu_d = g.call_function(torch.ops.npu.npu_dynamic_quant.default, (ph["x"],))
    mm = g.call_function(torch.ops.vllm.unquantized_gemm.default, (ph["x"], ph["w"]))
    for n in (dyn, sta, npu_s, npu_d):
        assert tw.is_quantize(n), n
    assert not tw.is_quantize(mm)
    assert [a.name for a in tw.token_aligned_args(dyn, is_token)] == ["out", "x", "scale"]
    assert [a.name for a in tw.token_aligned_args(sta, is_token)] == ["out", "x"]
    assert [a.name for a in tw.token_aligned_args(npu_s, is_token)] == ["x"]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("int_bias", [False, True])
def test_fc2_bias_terms_reproduce_the_fused_bias_standin(per_token, int_bias):
    """`odp_quant_blocks`' bias terms: the quantised matmul without its bias, plus term 0 (plus term 1
    times the per-token scale), equals the matmul with the bias, for vllm-ascend's int32 quant_bias
    (into the accumulator, before the dequant) and a float bias (after it); float64 rounding only."""
    from fxpasses.runtime_ops import bias_terms

    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (9, 16), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (16, 8), generator=g, dtype=torch.int8)
    scale = torch.rand(8, generator=g, dtype=torch.float64) * 1e-3
    s = torch.rand(9, generator=g).float() if per_token else None
    bias = (torch.randint(-5000, 5000, (8,), generator=g, dtype=torch.int32) if int_bias
            else torch.randn(8, generator=g, dtype=torch.float64))
    mm = torch.ops.npu.npu_quant_matmul
    want = mm(q, w, scale, pertoken_scale=s, bias=bias, output_dtype=torch.float64)
    terms = bias_terms(w, scale, bias, per_token, torch.float64)
    got = mm(q, w, scale, pertoken_scale=s, output_dtype=torch.float64) + terms[0]
    if per_token:
        got = got + terms[1] * s.double().unsqueeze(-1)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    row = 1 if (int_bias and per_token) else 0   # the bias lands in the one row it belongs to
    assert terms[row].any() and not terms[1 - row].any()
    zero = bias_terms(w, scale, None, per_token, torch.bfloat16)
    assert zero.dtype == torch.float32 and not zero.any()
