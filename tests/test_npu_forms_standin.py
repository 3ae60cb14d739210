"""Ascend NPU op forms (`fxpasses.op_forms.npu`), traced from stand-in ops with the real names and
schemas (`fxpasses.testing.npu_standin`: torch_npu and vllm_ascend do not exist on CPU).

Unit tests on small symbolic graphs: each form's token-wise rule, the matmul operands, the
collective kinds vllm-ascend's MoE ops take from their traced shapes, their bytes, the NZ weight
policy and the vllm-ascend switch it is read from. Then a tiny decoder from vLLM's TP layers whose
linears, norms, activation and rotary embedding are vllm-ascend's forms (float, W8A8 static and
W8A8 dynamic; `fxpasses.testing.models.npu_tiny`), rewritten with FlashComm1 and FlashComm2 at
TP=2 and TP=4 over gloo: the graph holds the forms, the collectives and site reasons are as
specified, and every rank's output equals the original graph's for many token counts."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fxpasses import comm_volume
from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses import tokenwise as tw
from fxpasses.testing import npu_standin
from fxpasses.commands.tp_run.harness import rank_capture, rank_compare
from helpers import bundled_spec

BUILDER = "fxpasses.testing.models.npu_tiny:build_npu_decoder"
NPU_OPS = ("npu::npu_rms_norm", "npu::npu_add_rms_norm", "_C_ascend::npu_add_rms_norm_bias", "npu::npu_swiglu",
           "vllm::npu_rotary_embedding", "vllm::unquantized_gemm", "vllm::quantize", "npu::npu_quant_matmul",
           "npu::npu_dynamic_quant", "vllm::maybe_pad_and_reduce", "vllm::maybe_all_gather_and_maybe_unpad",
           # what vllm-ascend's default graph fusions emit before fxpasses runs
           "npu::npu_add_rms_norm_quant", "npu::npu_add_rms_norm_dynamic_quant", "vllm::qkv_rmsnorm_rope",
           "vllm::muls_add")


@pytest.fixture(scope="module", autouse=True)
def standin_ops():
    npu_standin.ensure_npu_standin_ops()


def _trace(fn, *inputs):
    """Symbolic make_fx graph of fn; (nodes by op name, is_token) with the first input's dim 0 as T."""
    gm = make_fx(fn, tracing_mode="symbolic")(*inputs)
    T = gf.val(next(n for n in gm.graph.nodes if n.op == "placeholder")).shape[0]

    def is_token(n):
        v = gf.val(n)
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and gf.same_size(v.shape[0], T)

    by_op = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and not gf.is_getitem(n):
            by_op.setdefault(gf.op_name(n), n)
    return gm, by_op, is_token


def _aligned(by_op, is_token, op):
    got = tw.token_aligned_args(by_op[op], is_token)
    return None if got is None else [a.name for a in got]


# ---- the data and its rules (one process) -------------------------------------------------------

def test_every_npu_form_is_declared_and_fits_the_standin_schema_standin():
    forms = op_forms.forms()
    for op in NPU_OPS:
        assert op in forms and op_forms.platform_of(op) == "npu", op
        ns, name = op.split("::")
        target = getattr(getattr(torch.ops, ns), name).default
        assert op_forms._fits(forms[op], target), f"{op}: the record names arguments the schema lacks"
    # vLLM's own collectives are vLLM's, not redefined by the stand-ins
    assert "vllm::all_reduce" not in npu_standin.ensure_npu_standin_ops()
    assert str(torch.ops.vllm.all_reduce.default._schema) == "vllm::all_reduce(Tensor tensor, str group_name) -> Tensor"


def test_tokenwise_rules_of_npu_forms_standin():
    T, H = 5, 16

    def f(x, r, g, w, b, cache):
        y0, _ = torch.ops.npu.npu_rms_norm(x, g)
        y, rstd, res = torch.ops.npu.npu_add_rms_norm(y0, r, g, 1e-6)
        y2, _, _ = torch.ops._C_ascend.npu_add_rms_norm_bias(y, res, g, g, 1e-6)
        h = torch.ops.vllm.unquantized_gemm(y2, w, b)
        a = torch.ops.npu.npu_swiglu(h)
        q, k = torch.ops.vllm.npu_rotary_embedding(torch.arange(x.shape[0]), a, y0, cache, 8, 8, False)
        qi, s = torch.ops.npu.npu_dynamic_quant(q)
        o = torch.ops.npu.npu_quant_matmul(qi, w.to(torch.int8).t().contiguous(), b, pertoken_scale=s,
                                           output_dtype=torch.float32)
        z = torch.ops.vllm.quantize(o, g, g, g)
        return z, k, rstd, torch.ops.vllm.maybe_all_gather_and_maybe_unpad(y)

    gm, by_op, is_token = _trace(f, torch.randn(T, H), torch.randn(T, H), torch.randn(H), torch.randn(2 * H, H),
                                 torch.randn(2 * H), torch.randn(64, 8))
    assert _aligned(by_op, is_token, "npu::npu_rms_norm") == ["x_1"]
    assert _aligned(by_op, is_token, "npu::npu_add_rms_norm") == ["getitem", "r_1"]          # not gamma
    assert _aligned(by_op, is_token, "_C_ascend::npu_add_rms_norm_bias") == ["getitem_2", "getitem_4"]  # not beta
    assert _aligned(by_op, is_token, "vllm::unquantized_gemm") == ["getitem_5"]              # not weight, bias
    assert _aligned(by_op, is_token, "npu::npu_swiglu") == ["unquantized_gemm"]
    assert _aligned(by_op, is_token, "vllm::npu_rotary_embedding") == ["arange", "npu_swiglu", "getitem"]
    assert _aligned(by_op, is_token, "npu::npu_dynamic_quant") == ["getitem_8"]
    assert _aligned(by_op, is_token, "npu::npu_quant_matmul") == ["getitem_10", "getitem_11"]  # + pertoken_scale
    assert _aligned(by_op, is_token, "vllm::quantize") == ["npu_quant_matmul"]
    assert _aligned(by_op, is_token, "vllm::maybe_all_gather_and_maybe_unpad") == ["getitem_2"]  # the identity
    # every output of a token-wise form is token-major (rstd is [T, 1])
    rstd = next(u for u in by_op["npu::npu_add_rms_norm"].users if u.args[1] == 1)
    assert is_token(rstd) and tw.token_aligned_args(rstd, is_token) == [by_op["npu::npu_add_rms_norm"]]


def test_tokenwise_rules_of_the_fused_forms_standin():
    """The ops vllm-ascend's default fusions emit: token-wise on their token arguments only (not
    gamma, scales, weights, the rope cache), int8 dtype codes accepted as op-plugin types them."""
    T, H, D = 6, 16, 8

    def f(x, r, g, s, qkv, cache, y):
        q8, _, res = torch.ops.npu.npu_add_rms_norm_quant(x, r, g, s, None, epsilon=1e-6)
        d8, _, res2, scale, _ = torch.ops.npu.npu_add_rms_norm_dynamic_quant(res, x, g, beta=g,
                                                                            output_mask=[True, False])
        q, k, v = torch.ops.vllm.qkv_rmsnorm_rope(qkv, cache, torch.arange(qkv.shape[0]), g[:D], g[:D], 2 * D, D, D,
                                                  1e-6)
        m = torch.ops.vllm.muls_add(res2, y, 2.5)
        return q8, d8, scale, q, k, v, m

    gm, by_op, is_token = _trace(f, torch.randn(T, H), torch.randn(T, H), torch.rand(H) + 0.5, torch.rand(H) + 0.5,
                                 torch.randn(T, 4 * D), torch.randn(64, D), torch.randn(T, H))
    assert _aligned(by_op, is_token, "npu::npu_add_rms_norm_quant") == ["x_1", "r_1"]
    assert _aligned(by_op, is_token, "npu::npu_add_rms_norm_dynamic_quant") == ["getitem_2", "x_1"]
    assert _aligned(by_op, is_token, "vllm::qkv_rmsnorm_rope") == ["qkv_1", "arange"]
    assert _aligned(by_op, is_token, "vllm::muls_add") == ["getitem_5", "y_1"]
    assert tw.is_quantize(by_op["npu::npu_add_rms_norm_quant"])
    assert tw.is_quantize(by_op["npu::npu_add_rms_norm_dynamic_quant"])
    assert not tw.is_quantize(by_op["vllm::qkv_rmsnorm_rope"])
    # the reference kernels are the unfused ops, so the fusion changes no value
    x, r, g = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64), torch.rand(H) + 0.5
    y, _, res = torch.ops.npu.npu_add_rms_norm(x, r, g.double(), 1e-6)
    q, s = torch.ops.npu.npu_dynamic_quant(y, dst_type=1)  # an `int?` dtype code: int8
    fq, _, fres, fs, _ = torch.ops.npu.npu_add_rms_norm_dynamic_quant(x, r, g.double(), output_mask=[True, False])
    assert torch.equal(fq, q) and torch.equal(fs, s) and torch.equal(fres, res) and q.dtype == torch.int8


def test_the_default_fusions_run_in_vllm_ascends_order_and_keep_values_standin():
    """fuse_norm_quant replaces add-norm + quantize (static and dynamic) by the fused op, fuse_muls_add
    x * scale + y; the fused graph computes what the unfused one did; a switch turns a fusion off."""
    from fxpasses.testing.ascend_fusions import DEFAULT_ORDER, run_default_fusions

    def f(x, r, g, s, so, w):
        y, _, res = torch.ops.npu.npu_add_rms_norm(x, r, g, 1e-6)
        q = torch.ops.vllm.quantize(y, s, 1.0 / s, so)
        y2, _, res2 = torch.ops.npu.npu_add_rms_norm(res, x, g, 1e-6)
        d, sc = torch.ops.npu.npu_dynamic_quant(y2)
        o = torch.ops.npu.npu_quant_matmul(d, w, torch.ones(w.shape[1], dtype=torch.float64), pertoken_scale=sc,
                                           output_dtype=torch.float64)
        return q, o * 2.0 + res2

    T, H = 7, 16
    inputs = (torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64),
              torch.rand(H, dtype=torch.float64) + 0.5, torch.rand(H, dtype=torch.float64) * 0.02 + 0.01,
              torch.zeros(H, dtype=torch.float64), torch.randint(-8, 8, (H, H), dtype=torch.int8))
    assert DEFAULT_ORDER == ("fuse_norm_quant", "fuse_qknorm_rope", "fuse_muls_add")
    for cfg, counts in (({}, {"fuse_norm_quant": 2, "fuse_qknorm_rope": 0, "fuse_muls_add": 1}),
                        ({"fuse_norm_quant": False}, {"fuse_qknorm_rope": 0, "fuse_muls_add": 1})):
        gm = make_fx(f, tracing_mode="symbolic")(*inputs)
        want = gm(*inputs)
        assert run_default_fusions(gm.graph, cfg, routed_scaling_factor=2.0) == counts
        gm.recompile()
        names = {gf.op_name(n) for n in gm.graph.nodes if n.op == "call_function"}
        fused = cfg.get("fuse_norm_quant", True)
        assert ("npu::npu_add_rms_norm_quant" in names) == fused
        assert ("npu::npu_add_rms_norm_dynamic_quant" in names) == fused
        assert ("vllm::quantize" in names) != fused and "vllm::muls_add" in names
        got = gm(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_tokenwise_rules_refuse_the_token_dim_standin():
    # SwiGLU along dim 0 mixes token halves; M-RoPE positions [3, T] are not token-major
    _, by_op, is_token = _trace(lambda x: torch.ops.npu.npu_swiglu(x, 0), torch.randn(6, 16))
    assert _aligned(by_op, is_token, "npu::npu_swiglu") is None
    _, by_op, is_token = _trace(lambda x: torch.ops.npu.npu_swiglu(x, 1), torch.randn(6, 16))
    assert _aligned(by_op, is_token, "npu::npu_swiglu") == ["x_1"]
    _, by_op, is_token = _trace(
        lambda q, p, c: torch.ops.vllm.npu_rotary_embedding(p, q, q, c, 8, 8, True),
        torch.randn(5, 16), torch.zeros(3, 5, dtype=torch.long), torch.randn(64, 8))
    assert _aligned(by_op, is_token, "vllm::npu_rotary_embedding") is None
    # a matmul against a token-major right operand is not token-wise
    _, by_op, is_token = _trace(lambda x, y: torch.ops.vllm.unquantized_gemm(x, y), torch.randn(5, 5), torch.randn(5, 5))
    assert _aligned(by_op, is_token, "vllm::unquantized_gemm") is None


def test_matmul_operands_and_sites_standin():
    from fxpasses.sites import _matmul_operands

    _, by_op, _ = _trace(lambda x, w, b: torch.ops.vllm.unquantized_gemm(x, w, b),
                         torch.randn(5, 16), torch.randn(8, 16), torch.randn(8))
    mm = by_op["vllm::unquantized_gemm"]
    assert gf.is_matmul(mm) and [a.name for a in _matmul_operands(mm)] == ["x_1", "w_1", "b_1"]
    _, by_op, _ = _trace(lambda x, w, s, p: torch.ops.npu.npu_quant_matmul(x, w, s, pertoken_scale=p,
                                                                          output_dtype=torch.float32),
                         torch.zeros(5, 16, dtype=torch.int8), torch.zeros(16, 8, dtype=torch.int8),
                         torch.ones(8), torch.ones(5))
    mm = by_op["npu::npu_quant_matmul"]
    x, w, b = _matmul_operands(mm)
    assert gf.is_matmul(mm) and (x.name, w.name, b) == ("x_1", "w_1", None)


@pytest.mark.parametrize("sp", [False, True], ids=["flashcomm_off", "sequence_parallel"])
def test_moe_communication_ops_by_traced_shape_standin(monkeypatch, sp):
    """maybe_pad_and_reduce: same rows = a TP all-reduce (a reduce site), fewer = reduce_scatter;
    maybe_all_gather_and_maybe_unpad: same rows = the identity, more = all_gather. Bytes counted."""
    monkeypatch.setattr(npu_standin, "SEQUENCE_PARALLEL", sp)
    monkeypatch.setattr(npu_standin, "_world_size", lambda: 4)
    torch._subclasses.fake_tensor.FakeTensorMode.cache_clear()  # the fake kernels read the switch
    gm, by_op, _ = _trace(lambda x: torch.ops.vllm.maybe_all_gather_and_maybe_unpad(
        torch.ops.vllm.maybe_pad_and_reduce(x)), torch.randn(8, 16))
    red, gat = by_op["vllm::maybe_pad_and_reduce"], by_op["vllm::maybe_all_gather_and_maybe_unpad"]
    assert gf.collective_group(red) == "tp" and gf.collective_input(red).name == "x_1"
    ar = gf.match_all_reduce(red)
    vols = comm_volume.collective_volumes(gm.graph, default_group_size=4)
    T = 1000
    subs = dict(zip(comm_volume.token_symbols(gm.graph), (T, 16)))  # make_fx made both dims symbolic
    if not sp:
        assert gf.collective_kind(red) == "all_reduce" and gf.collective_kind(gat) is None
        assert ar is not None and ar.form == "vllm" and ar.input.name == "x_1" and ar.result is red
        assert ar.runs_on(object())  # names no group: TP's
        assert [v.kind for v in vols] == ["all_reduce"]
        assert comm_volume.evaluate(vols[0].send_bytes, subs) == 2 * 3 * T * 16 * 4 // 4
    else:
        assert gf.collective_kind(red) == "reduce_scatter" and gf.collective_kind(gat) == "all_gather"
        assert ar is None and tw.token_aligned_args(gat, lambda n: True) is None
        assert [v.kind for v in vols] == ["reduce_scatter", "all_gather"]
        assert comm_volume.evaluate(vols[0].send_bytes, subs) == 3 * T * 16 * 4 // 4


def test_weight_format_policy_standin():
    form = op_forms.forms()["vllm::unquantized_gemm"]
    qform = op_forms.forms()["npu::npu_quant_matmul"]
    _, by_op, _ = _trace(lambda x, w, wq: (torch.ops.vllm.unquantized_gemm(x, w), w.float(), wq + 0),
                         torch.randn(5, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64),
                         torch.zeros(16, 8, dtype=torch.int8))
    w64 = next(n for n in by_op["vllm::unquantized_gemm"].all_input_nodes if n.name == "w_1")
    w32 = by_op["aten::_to_copy"]          # a float32 weight: vllm-ascend never converts it to NZ
    w8 = by_op["aten::add"]                # an int8 weight
    refuse = op_forms.weight_block_refusal
    assert "NZ" in refuse(form, w64, "unknown") and "weight_format='nd'" in refuse(form, w64, "nz")
    assert refuse(form, w64, "nd") is None and refuse(form, w64, "nd_float") is None
    assert refuse(form, w32, "unknown") is None and refuse(form, w32, "nz") is None
    assert refuse(qform, w8, "nd_float") is not None and refuse(qform, w8, "nd") is None


@pytest.mark.parametrize("env, additional, fmt", [
    ({"VLLM_ASCEND_ENABLE_NZ": "0"}, None, "nd"),
    ({"VLLM_ASCEND_ENABLE_NZ": "1"}, None, "nd_float"),
    ({"VLLM_ASCEND_ENABLE_NZ": "2"}, None, "nz"),
    ({"VLLM_ASCEND_ENABLE_NZ": "2"}, {"weight_nz_mode": 0}, "nd"),   # additional_config wins, as there
    ({}, None, "unknown"),
])
def test_weight_format_from_vllm_ascend_nz_mode_standin(env, additional, fmt):
    from fxpasses.config import load_config

    assert load_config(additional, env=env).weight_format == fmt


def test_weight_format_refuses_bad_values_standin():
    from fxpasses.config import FxPassesConfig, load_config
    from fxpasses.errors import ConfigError

    with pytest.raises(ConfigError, match="not a vllm-ascend weight NZ mode"):
        load_config(env={"VLLM_ASCEND_ENABLE_NZ": "3"})
    with pytest.raises(ConfigError, match="weight_format must be one of"):
        FxPassesConfig(weight_format="NZ")


# ---- the NPU-form decoder at TP=2 and TP=4 ------------------------------------------------------

FLOAT = dict(qkv_bias=True, o_proj_bias=True)   # biases ride in unquantized_gemm (o_proj's on TP rank 0 only)
FC1, FC2, FC12 = ("flashcomm1",), ("flashcomm2",), ("flashcomm1", "flashcomm2")
ND = {"weight_format": "nd"}
# id: (tp, quant, spec extras, strategies, config extras, collectives after)
CASES = {
    "tp2-float-fc1+fc2-nz": (2, "none", FLOAT, FC12, {}, dict(all_reduce=0, reduce_scatter=5, all_gather=5)),
    "tp2-float-fc1+fc2-nd": (2, "none", FLOAT, FC12, ND, dict(all_reduce=0, reduce_scatter=3, all_gather=5,
                                                               all_to_all=2)),
    "tp2-float-fc2-nd": (2, "none", FLOAT, FC2, ND, dict(all_reduce=3, reduce_scatter=0, all_gather=2, all_to_all=2)),
    "tp2-w8a8-fc1": (2, "w8a8", {}, FC1, {}, dict(all_reduce=0, reduce_scatter=5, all_gather=5)),
    # per-token quantisation runs on the shards: int8 values and their scales gathered (one gather per
    # column); FlashComm2 exchanges the quantised o_proj input as int8 (tests/test_int8_on_the_wire.py)
    "tp2-w8a8dyn-fc1+fc2": (2, "w8a8_dynamic", {}, FC12, ND, dict(all_reduce=0, reduce_scatter=3, all_gather=5,
                                                                    all_to_all=2)),
    "tp4-float-fc1+fc2-nd-K2": (4, "none", FLOAT, FC12, dict(ND, flashcomm2_oproj_tp_size=2),
                                dict(all_reduce=0, reduce_scatter=5, all_gather=5, all_to_all=2)),
    "tp4-w8a8dyn-fc1+fc2-nz": (4, "w8a8_dynamic", {}, FC12, {}, dict(all_reduce=0, reduce_scatter=5, all_gather=5)),
}
QUANT_OPS = {"none": ("vllm::unquantized_gemm",), "w8a8": ("vllm::quantize", "npu::npu_quant_matmul"),
             "w8a8_dynamic": ("npu::npu_dynamic_quant", "npu::npu_quant_matmul")}
COMMON_OPS = ("npu::npu_rms_norm", "npu::npu_add_rms_norm", "_C_ascend::npu_add_rms_norm_bias", "npu::npu_swiglu",
              "vllm::npu_rotary_embedding", "vllm::maybe_pad_and_reduce", "vllm::all_reduce")


def _capture(pools, case):
    tp, quant, extra, strategies, cfg, _ = CASES[case]
    pool = pools.get(tp, "vllm")  # vLLM's custom-op collectives, as vllm-ascend's graphs have them
    spec = bundled_spec(num_hidden_layers=2, **extra)
    config = {"strategies": list(strategies), **cfg}
    return pool, pool.run(rank_capture, spec, config, "float64", False, builder=BUILDER,
                          builder_kwargs={"quant": quant})


def _text_has(text: str, op: str) -> bool:
    ns, name = op.split("::")
    return f"torch.ops.{ns}.{name}.default(" in text


def _o_proj(summary):
    return [s for s in summary["report"]["sites"] if s["prefix"].endswith("o_proj")]


@pytest.mark.parametrize("case", list(CASES))
def test_npu_decoder_rewritten_structure_standin(pools, case):
    tp, quant, _, strategies, cfg, after = CASES[case]
    _, summaries = _capture(pools, case)
    for s in summaries:
        rep = s["report"]
        for op in COMMON_OPS + QUANT_OPS[quant]:
            assert _text_has(s["before"], op), f"{op} missing from the traced graph"
            if op != "vllm::all_reduce" and not (op == "vllm::maybe_pad_and_reduce" and "flashcomm1" in strategies):
                assert _text_has(s["after"], op), f"{op} missing from the rewritten graph"
        assert rep["applied"], rep["reason"]
        assert rep["collectives_before"] == dict(all_reduce=5, reduce_scatter=0, all_gather=0, all_to_all=0)
        assert rep["collectives_after"] == {"all_to_all": 0, **after}
        assert rep["bytes_per_step"]["after"] <= rep["bytes_per_step"]["before"]
        sites = {x["prefix"]: x for x in rep["sites"]}
        # layer 1's MLP ends in vllm.maybe_pad_and_reduce: a reduce site; its down_proj does not reduce
        moe = sites["model.layers.1.mlp"]
        assert moe["kind"] == "reduce" and moe["all_reduce"] == "vllm"
        assert moe["status"] == ("rewritten" if "flashcomm1" in strategies else "untouched")
        assert sites["model.layers.1.mlp.down_proj"]["status"] == "untouched"
        o_proj = _o_proj(s)
        assert len(o_proj) == 2
        for x in o_proj:
            if "flashcomm2" not in strategies:
                assert x["strategy"] == "flashcomm1" and x["status"] == "rewritten", x
            elif quant == "none" and cfg.get("weight_format") == "nd":
                assert x["strategy"] == "flashcomm2" and x["status"] == "rewritten", x
                assert "all_to_all over odp" in x["reason"], x
            elif quant == "none":  # float64 weights may be NZ: no block of them in the graph
                assert x["strategy"] == "flashcomm1" and x["status"] == "rewritten", x
                assert "flashcomm2 skipped it: FlashComm2 needs a block of the o_proj weight" in x["reason"], x
                assert "NZ" in x["reason"] and "weight_format='nd'" in x["reason"], x
            elif cfg.get("weight_format") == "nd":  # plain int8 weights: int8 on the wire
                assert x["strategy"] == "flashcomm2" and x["status"] == "rewritten", x
                assert "int8 on the wire" in x["reason"], x
            else:
                assert x["strategy"] == "flashcomm1" and "(int8) may be stored in the device-private NZ" in x["reason"]
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1


def _tokens(tp):
    return sorted({1, 2, tp - 1, tp, tp + 1, 7, 3 * tp + 1, 64, 129, 255})


@pytest.mark.parametrize("case", list(CASES))
def test_npu_decoder_matches_original_per_rank_standin(pools, case):
    """float64: every rank's output equals the original graph's (a wrong or missing collective is off
    by O(1); the int8 quantisation steps are far above the float64 differences of a reordered sum)."""
    tp = CASES[case][0]
    pool, summaries = _capture(pools, case)
    tokens = _tokens(tp)
    for rank, results in enumerate(pool.run(rank_compare, summaries[0]["key"], tokens)):
        assert [r["T"] for r in results] == tokens
        for r in results:
            assert r["shape_ok"], (rank, r)
            assert r["rel"] <= 1e-10, (rank, r)


# vllm-ascend's default fusions run first (fxpasses.testing.ascend_fusions): the norms at the reduce
# sites are fused with the next linear's quantisation; FlashComm1 still shards them and gathers int8
# id: (tp, quant, strategies, config extras, collectives after: as many as without the fusions, so the
# dynamic scheme's int8 values and scales still travel in one gather; model extras, the fused op)
_FC1_AFTER = dict(all_reduce=0, reduce_scatter=5, all_gather=5, all_to_all=0)
_FC12_ND_AFTER = dict(all_reduce=0, reduce_scatter=3, all_gather=5, all_to_all=2)
_NQ = {"w8a8": "npu::npu_add_rms_norm_quant", "w8a8_dynamic": "npu::npu_add_rms_norm_dynamic_quant"}
FUSED_CASES = {
    "tp2-w8a8-fc1": (2, "w8a8", FC1, {}, _FC1_AFTER, {}, _NQ["w8a8"]),
    "tp4-w8a8-fc1": (4, "w8a8", FC1, {}, _FC1_AFTER, {}, _NQ["w8a8"]),
    "tp2-w8a8dyn-fc1+fc2-nd": (2, "w8a8_dynamic", FC12, ND, _FC12_ND_AFTER, {}, _NQ["w8a8_dynamic"]),
    "tp4-w8a8dyn-fc1": (4, "w8a8_dynamic", FC1, {}, _FC1_AFTER, {}, _NQ["w8a8_dynamic"]),
    # Qwen3-style q/k norms: fuse_qknorm_rope's vllm.qkv_rmsnorm_rope after the qkv_proj
    "tp2-float-qknorm-fc1+fc2-nd": (2, "none", FC12, ND, _FC12_ND_AFTER, dict(FLOAT, qk_norm=True),
                                    "vllm::qkv_rmsnorm_rope"),
    "tp2-w8a8dyn-qknorm-fc1": (2, "w8a8_dynamic", FC1, {}, _FC1_AFTER, dict(qk_norm=True), "vllm::qkv_rmsnorm_rope"),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_npu_decoder_after_vllm_ascends_default_fusions_standin(pools, case):
    """What fxpasses receives on vllm-ascend: its default fusions' ops (fused norm + quantisation at
    every residual norm feeding a quantised linear, q/k norm + rope after qkv_proj). The strategies
    rewrite every all-reduce as without the fusions, with the same collectives (int8 gathered where
    the fused op quantises: fewer bytes than the all-reduces), the same on every rank; every rank's
    output equals the fused original's (float64)."""
    tp, quant, strategies, cfg, after, extra, fused = FUSED_CASES[case]
    pool = pools.get(tp, "vllm")
    summaries = pool.run(rank_capture, bundled_spec(num_hidden_layers=2, **extra),
                         {"strategies": list(strategies), **cfg}, "float64", False, builder=BUILDER,
                         builder_kwargs={"quant": quant},
                         pre_pass="fxpasses.testing.ascend_fusions:run_default_fusions")
    for s in summaries:
        rep = s["report"]
        assert s["before"].count(f"torch.ops.{fused.replace('::', '.')}.default(") >= 2, s["before"]
        if extra.get("qk_norm"):
            assert "torch.ops.vllm.npu_rotary_embedding.default(" not in s["before"]  # every rope was fused
        assert rep["applied"], rep["reason"]
        assert rep["collectives_before"]["all_reduce"] == 5 and rep["collectives_after"] == after
        if quant == "none":
            assert rep["bytes_per_step"]["after"] <= rep["bytes_per_step"]["before"]
        else:
            assert rep["bytes_per_step"]["after"] < rep["bytes_per_step"]["before"]
    assert len({s["report"]["fingerprint_digest"] for s in summaries}) == 1
    tokens = _tokens(tp)
    for rank, results in enumerate(pool.run(rank_compare, summaries[0]["key"], tokens)):
        assert [r["T"] for r in results] == tokens
        assert all(r["shape_ok"] and r["rel"] <= 1e-10 for r in results), (rank, results)


def test_qknorm_rope_fusion_keeps_values_standin():
    """fuse_qknorm_rope on split -> per-head npu_rms_norm of q and k -> neox rope: one
    vllm.qkv_rmsnorm_rope, no rope or norm left, the same q, k and v; a GPT-J rope is not fused."""
    from fxpasses.testing.ascend_fusions import fuse_qknorm_rope

    T, hd, nq, nkv = 5, 8, 4, 2

    def f(qkv, pos, cache, gq, gk, neox: bool):
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q, _ = torch.ops.npu.npu_rms_norm(q.reshape(T, nq, hd), gq, 1e-6)
        k, _ = torch.ops.npu.npu_rms_norm(k.reshape(T, nkv, hd), gk, 1e-6)
        q, k = torch.ops.vllm.npu_rotary_embedding(pos, q.reshape(T, nq * hd), k.reshape(T, nkv * hd), cache, hd, hd,
                                                   neox)
        return q, k, v * 1.5

    args = (torch.randn(T, (nq + 2 * nkv) * hd, dtype=torch.float64), torch.arange(T), torch.randn(16, hd,
            dtype=torch.float64), torch.rand(hd, dtype=torch.float64) + 0.5, torch.rand(hd, dtype=torch.float64) + 0.5)
    for neox, n in ((True, 1), (False, 0)):
        gm = make_fx(lambda *a: f(*a, neox), tracing_mode="symbolic")(*args)
        want = gm(*args)
        assert fuse_qknorm_rope(gm.graph) == n
        gm.graph.lint()
        gm.recompile()
        names = [gf.op_name(x) for x in gm.graph.nodes if x.op == "call_function"]
        assert ("vllm::qkv_rmsnorm_rope" in names) == bool(n)
        assert ("vllm::npu_rotary_embedding" in names) != bool(n) and ("npu::npu_rms_norm" in names) != bool(n)
        assert all(torch.equal(a, b) for a, b in zip(gm(*args), want, strict=True))


def test_fc2_alone_with_nz_weights_leaves_the_graph_standin(pools):
    """FlashComm2 alone on weights that may be NZ: every o_proj site skipped with the reason, the
    graph kept as it was."""
    pool = pools.get(2, "vllm")
    summaries = pool.run(rank_capture, bundled_spec(num_hidden_layers=2, **FLOAT), {"strategies": ["flashcomm2"]},
                         "float64", False, builder=BUILDER, builder_kwargs={"quant": "none"})
    for s in summaries:
        rep = s["report"]
        assert not rep["applied"] and rep["collectives_after"] == rep["collectives_before"]
        for x in _o_proj(s):
            assert x["status"] == "skipped" and "device-private NZ" in x["reason"], x
