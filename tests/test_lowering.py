"""The lowering (`fxpasses.lowering`): matmul + collective pairs fused into one kernel.

* CPU reference backend (`lowering: reference`): on every rank the fused graph computes what the
  unfused one did (float64, relative error <= 1e-12: the reference kernels run the very matmul and
  collective of the pair), for models from real vLLM layers, plain TP and with FlashComm1 /
  FlashComm2: at TP=2 the vllm-form cases (plain TP and each strategy) on `helpers.SHAPES[2]`'s first
  shape (2 layers, GQA 2, qkv and o_proj bias, q/k norm), the c10d-form case (FlashComm1+FlashComm2)
  on its second (3 layers, 8 heads on 1 kv head, o_proj and MLP bias), at TP=4 plain TP and
  FlashComm1+FlashComm2 on `SHAPES[4]` (8 heads on 2 kv heads, all biases); token counts are
  TOKEN_SETS sets made from `examples(1)` drawn seeds (1, tp - 1, tp, tp + 1, 3 tp + 1 and 3 to 6
  counts in 1..200); the
  number of each fused op is exact (per layer: plain TP 2 mm_all_reduce; FlashComm1 2
  all_gather_mm + 2 mm_reduce_scatter; FlashComm1+FlashComm2 2 all_gather_mm + 1 mm_reduce_scatter;
  FlashComm2 alone 1 mm_all_reduce).
* `auto` on CPU changes nothing (no fused kernels on CPU) and says so.
* NPU and CUDA forms through stand-ins (`standin` tests): the emitted node's op and arguments
  (hcom name, reduce_op, bias only on TP rank 0 for matmul-all-reduce, W8A8 dequant scale and the
  rank-0 bias term for the reduce-scatter), the refusals with their reasons, and bytes on the wire
  equal before and after (`comm_volume` counts a fused op as its collective). The NPU stand-ins
  have CPU kernels, so their numbers are compared too: W8A8 in float64 exactly (<= 1e-12), bfloat16
  float layers within 3e-2 relative (bf16's own rounding: the stand-in kernel rounds the padded
  product differently from the unfused graph's matmul).
"""
import pytest
from hypothesis import given, settings

from helpers import SEEDS, bundled_spec, compare_many, edge_counts, examples, shape_cases
from fxpasses.config import FxPassesConfig
from fxpasses.errors import ConfigError
from fxpasses.lowering import backends
from fxpasses.commands.tp_run.harness import rank_capture
from fxpasses.testing.lowering_standin import rank_lower

AR, RS, AG = "fxpasses::mm_all_reduce", "fxpasses::mm_reduce_scatter", "fxpasses::all_gather_mm"
PER_LAYER = {(): {AR: 2}, ("flashcomm1",): {AG: 2, RS: 2}, ("flashcomm1", "flashcomm2"): {AG: 2, RS: 1},
             ("flashcomm2",): {AR: 1}}
BUILDER = "fxpasses.testing.models.npu_tiny:build_npu_decoder"


def _reference_equivalence(pool, tp, strategies, spec, seed):
    layers = spec["num_hidden_layers"]
    summaries = pool.run(rank_capture, spec, {"strategies": list(strategies), "lowering": "reference"}, "float64", False)
    for s in summaries:
        rec = s["report"]["lowering"]
        assert rec["backend"] == "reference", rec
        assert rec["fused"] == {op: n * layers for op, n in PER_LAYER[strategies].items()}, rec
        assert all(site["op"] for site in rec["sites"]), rec["sites"]
    compare_many(pool, summaries[0]["key"], seed, edge_counts(tp), hi=200)


# the vllm-form cases run the first TP=2 shape, the c10d-form case the second (one capture each)
_TP2_SHAPES = dict(zip(("vllm", "c10d"), shape_cases(2)))
# every strategy on vLLM's collective form; c10d's form once, with the strategies that use all three
CASES_TP2 = [("vllm", s) for s in PER_LAYER] + [("c10d", ("flashcomm1", "flashcomm2"))]
TP4 = [(), ("flashcomm1", "flashcomm2")]  # plain TP and both strategies (every fused kind) at TP=4


@pytest.mark.parametrize("form,strategies", CASES_TP2, ids=[f"{f}-{'+'.join(s) or 'tp'}" for f, s in CASES_TP2])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_reference_lowering_matches_unfused_tp2(pools, form, strategies, seed):
    _reference_equivalence(pools.get(2, form), 2, strategies, _TP2_SHAPES[form].values[0], seed)


@pytest.mark.parametrize("strategies", TP4, ids=["+".join(s) or "tp" for s in TP4])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_reference_lowering_matches_unfused_tp4(pools, strategies, seed):
    _reference_equivalence(pools.get(4, "vllm"), 4, strategies, shape_cases(4)[0].values[0], seed)


def test_auto_on_cpu_changes_nothing(pools):
    pool = pools.get(2, "vllm")
    spec = bundled_spec(num_hidden_layers=1)
    auto = pool.run(rank_capture, spec, {"strategies": ["flashcomm1"]}, "float64", False)
    off = pool.run(rank_capture, spec, {"strategies": ["flashcomm1"], "lowering": "off"}, "float64", False)
    for a, o in zip(auto, off):
        assert a["after"] == o["after"]
        rec = a["report"]["lowering"]
        assert rec["backend"] is None and rec["reason"] == "no fused kernels on CPU" and rec["fused"] == {}
        assert "lowering" not in o["report"]


def test_lowering_in_the_site_report_and_dump(pools, tmp_path):
    pool = pools.get(2, "vllm")
    summaries = pool.run(rank_capture, bundled_spec(num_hidden_layers=1),
                         {"strategies": [], "lowering": "reference", "dump_dir": str(tmp_path)}, "float64", False)
    assert summaries[0]["report"]["lowering"]["fused"] == {AR: 2}
    for r in (0, 1):
        text = (tmp_path / f"rank{r}" / "site_report.txt").read_text()
        assert "lowering (reference): fxpasses::mm_all_reduce x2" in text
        assert "model.layers.0.self_attn.o_proj mm_all_reduce: -> fxpasses::mm_all_reduce" in text
        assert "fxpasses.mm_all_reduce.default" in (tmp_path / f"rank{r}" / "lowered.after.py").read_text()


def test_reference_ops_registered_at_import():
    """A graph loaded from a compile cache in a new process finds the lowering's ops after `import fxpasses`."""
    import subprocess
    import sys

    code = ("import fxpasses, torch\n"
            "for n in ('mm_all_reduce', 'mm_reduce_scatter', 'all_gather_mm', 'rank0_bias'):\n"
            "    getattr(torch.ops.fxpasses, n).default\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_lowering_config_key():
    assert FxPassesConfig().lowering == "auto"
    assert FxPassesConfig.from_dict({"lowering": "reference"}).lowering == "reference"
    with pytest.raises(ConfigError, match="lowering must be one of"):
        FxPassesConfig.from_dict({"lowering": "npu"})
    from fxpasses.lowering.lower import NO_CPU_KERNELS, choose

    assert choose("auto") == (None, NO_CPU_KERNELS)
    assert choose("off")[0] is None
    assert choose("reference")[0].name == "reference"


# ---- NPU and CUDA forms through stand-ins ----------------------------------------------------------------

# k >= 256 for npu_mm_reduce_scatter_base / npu_all_gather_base_mm: o_proj's k = 4 x 128 / 2, down's 512 / 2
BIG = dict(num_hidden_layers=1, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
           intermediate_size=512, vocab_size=128, o_proj_bias=True)


def _npu_capture(pool, strategies, dtype, quant, **spec):
    return pool.run(rank_capture, bundled_spec(**{**BIG, **spec}), {"strategies": strategies, "lowering": "off"},
                    dtype, False, builder=BUILDER, builder_kwargs={"quant": quant, "moe_reduce": False})


def _by_op(r):
    out = {}
    for e in r["emitted"]:
        out.setdefault(e["op"], []).append(e)
    return out


@pytest.mark.parametrize("soc, env, mode", [
    (None, {}, "aiv"),                                             # no torch_npu: the A2/A3 default
    (223, {}, "aiv"), (253, {"HCCL_OP_EXPANSION_MODE": "CCU_SCHED"}, "aiv"),   # A2, A3: CCU is A5's
    (260, {}, "ai_cpu"), (260, {"HCCL_OP_EXPANSION_MODE": "AIV"}, "ai_cpu"),   # A5 (Ascend 950)
    (260, {"HCCL_OP_EXPANSION_MODE": "CCU_SCHED"}, "ccu"),
])
def test_npu_comm_mode_follows_the_chip(soc, env, mode):
    """Newer CANN refuses comm_mode "aiv" on Ascend 950 (vllm-ascend #12689)."""
    assert backends.npu_comm_mode(soc, env) == mode


def test_soc_version_is_read_from_torch_npu_standin(monkeypatch):
    """The chip is torch_npu.npu.get_soc_version() (a stand-in module here), read once per process."""
    import sys
    from types import SimpleNamespace

    calls = []
    monkeypatch.setitem(sys.modules, "torch_npu", SimpleNamespace(npu=SimpleNamespace(
        get_soc_version=lambda: calls.append(1) or 260)))
    backends.soc_version.cache_clear()
    try:
        assert backends.soc_version() == 260 and backends.soc_version() == 260 and len(calls) == 1
        assert backends.npu_comm_mode(backends.soc_version(), {}) == "ai_cpu"
    finally:
        backends.soc_version.cache_clear()


def test_npu_matmul_reduce_scatter_is_fused_at_most_over_8_ranks():
    """npu_mm_reduce_scatter_base fails at 16 ranks (vllm-ascend #6168); the other kernels take 16 and 32."""
    for size in (2, 4, 8):
        assert all(backends.npu_group_refusal(k, size) is None for k in ("mm_all_reduce", "mm_reduce_scatter",
                                                                         "all_gather_mm"))
    for size in (16, 32):
        assert "fails above 8" in backends.npu_group_refusal("mm_reduce_scatter", size)
        assert backends.npu_group_refusal("mm_all_reduce", size) is None
        assert backends.npu_group_refusal("all_gather_mm", size) is None
    assert "the fused kernels take" in backends.npu_group_refusal("all_gather_mm", 6)


def test_npu_matmul_all_reduce_standin(pools):
    """Plain TP: o_proj and down_proj become npu_mm_all_reduce_base over the TP communicator; the row
    bias only in TP rank 0's call (the seed's MatmulAllreduceRowParallelOp)."""
    pool = pools.get(2, "vllm")
    summaries = _npu_capture(pool, [], "bfloat16", "none")
    for r in pool.run(rank_lower, summaries[0]["key"], "npu", [1, 3, 8]):
        assert r["record"]["fused"] == {"npu::npu_mm_all_reduce_base": 2}
        o_proj, down = _by_op(r)["npu::npu_mm_all_reduce_base"]
        for e in (o_proj, down):
            assert e["args"][2] == "hcom_standin_tp" and e["kwargs"]["reduce_op"] == "sum"
            assert e["tag"]["group_size"] == 2
        assert (o_proj["kwargs"]["bias"] is not None) == (r["rank"] == 0)
        assert down["kwargs"]["bias"] is None
        assert r["rank0_bias"] == 0
        assert r["bytes"]["fused"] == r["bytes"]["unfused"] > 0
        assert all(c["shape_ok"] and c["rel"] <= 3e-2 for c in r["compare"]), r["compare"]
    # vllm.unquantized_gemm's [N, K] weight may be NZ unless plain weights are declared: not fused
    for r in pool.run(rank_lower, summaries[0]["key"], "npu", None, True, "unknown"):
        assert r["record"]["fused"] == {}
        assert all(s["reason"].startswith("weight format: vllm::unquantized_gemm") for s in r["record"]["sites"])


def test_npu_flashcomm1_reduce_scatter_and_all_gather_standin(pools):
    """FlashComm1: row layers -> pad + npu_mm_reduce_scatter_base (no kernel bias, comm_mode aiv) + the
    rank-0 bias term; column layers -> npu_all_gather_base_mm (gather_output)."""
    pool = pools.get(2, "vllm")
    summaries = _npu_capture(pool, ["flashcomm1"], "bfloat16", "none")
    for r in pool.run(rank_lower, summaries[0]["key"], "npu", [1, 3, 8]):
        ops = _by_op(r)
        assert r["record"]["fused"] == {"npu::npu_all_gather_base_mm": 2, "npu::npu_mm_reduce_scatter_base": 2}
        for e in ops["npu::npu_mm_reduce_scatter_base"]:
            assert e["args"][0]["op"] == "aten::constant_pad_nd" and e["args"][2:] == ["hcom_standin_tp", 2]
            assert e["kwargs"] == {"reduce_op": "sum", "bias": None, "comm_turn": 0, "comm_mode": "aiv"}
        for e in ops["npu::npu_all_gather_base_mm"]:
            assert e["args"][2:] == ["hcom_standin_tp", 2] and e["kwargs"]["gather_output"] is True
            assert e["kwargs"]["bias"] is None
        assert r["rank0_bias"] == 2
        assert r["bytes"]["fused"] == r["bytes"]["unfused"] > 0
        assert all(c["shape_ok"] and c["rel"] <= 3e-2 for c in r["compare"]), r["compare"]


def test_npu_w8a8_reduce_scatter_standin(pools):
    """W8A8 static under FlashComm1: the int8 activation padded into npu_mm_reduce_scatter_base with the
    dequant scale (x2_scale) and output dtype, the row bias term from rank 0 added on every rank;
    all-gather-matmul refused for the quantised column layers. Exact in float64."""
    pool = pools.get(2, "vllm")
    summaries = _npu_capture(pool, ["flashcomm1"], "float64", "w8a8")
    for r in pool.run(rank_lower, summaries[0]["key"], "npu", [1, 3, 8, 33]):
        rec = r["record"]
        assert rec["fused"] == {"npu::npu_mm_reduce_scatter_base": 2}
        for e in _by_op(r)["npu::npu_mm_reduce_scatter_base"]:
            assert e["kwargs"]["x2_scale"] is not None and e["kwargs"]["output_dtype"] == "torch.float64"
            assert e["kwargs"]["bias"] is None and e["kwargs"]["comm_mode"] == "aiv"
        refused = [s for s in rec["sites"] if not s["op"]]
        assert [s["pair"] for s in refused] == ["all_gather_mm", "all_gather_mm"]
        assert all(s["reason"].startswith("quantization scheme: w8a8") for s in refused)
        assert r["rank0_bias"] == 2
        assert r["bytes"]["fused"] == r["bytes"]["unfused"]
        assert all(c["shape_ok"] and c["rel"] <= 1e-12 for c in r["compare"]), r["compare"]


def test_npu_refusals_standin(pools):
    """Shape (k outside [256, 65535)), dtype (float32/64) and a group without an HCCL name are refused
    with their reasons; nothing is fused."""
    pool = pools.get(2, "vllm")
    small = _npu_capture(pool, ["flashcomm1"], "bfloat16", "none", hidden_size=64, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=32, intermediate_size=128)
    for r in pool.run(rank_lower, small[0]["key"], "npu"):
        assert r["record"]["fused"] == {}
        assert all(s["reason"].startswith("shape: k=") for s in r["record"]["sites"]), r["record"]["sites"]
    f64 = _npu_capture(pool, [], "float64", "none", hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=32, intermediate_size=128)
    for r in pool.run(rank_lower, f64[0]["key"], "npu"):
        assert r["record"]["fused"] == {}
        assert all(s["reason"].startswith("dtype: torch.float64") for s in r["record"]["sites"])


def test_cuda_symm_mem_forms_standin(pools):
    """CUDA: symm_mem.fused_matmul_reduce_scatter(A, B, 'sum', 0, group) and
    fused_all_gather_matmul(A, [B], 0, group, return_A=True), only once the group has symmetric memory;
    plain TP's matmul + all-reduce stays (symm_mem has no fused all-reduce)."""
    pool = pools.get(2, "c10d")
    fc1 = pool.run(rank_capture, bundled_spec(num_hidden_layers=1, o_proj_bias=True),
                   {"strategies": ["flashcomm1"], "lowering": "off"}, "float64", False)
    for r in pool.run(rank_lower, fc1[0]["key"], "cuda", None, False):
        assert r["record"]["fused"] == {}
        assert all("symmetric memory is not enabled" in s["reason"] for s in r["record"]["sites"])
    for r in pool.run(rank_lower, fc1[0]["key"], "cuda"):
        ops = _by_op(r)
        assert r["record"]["fused"] == {"symm_mem::fused_all_gather_matmul": 2, "symm_mem::fused_matmul_reduce_scatter": 2}
        for e in ops["symm_mem::fused_matmul_reduce_scatter"]:
            assert e["args"][0]["op"] == "aten::constant_pad_nd" and e["args"][2:4] == ["sum", 0]
            assert e["args"][4] == e["tag"]["group"]
        for e in ops["symm_mem::fused_all_gather_matmul"]:
            assert len(e["args"][1]) == 1 and e["args"][2] == 0 and e["kwargs"] == {"return_A": True}
        assert r["rank0_bias"] == 2
        assert r["bytes"]["fused"] == r["bytes"]["unfused"] > 0
    for r in pool.run(rank_lower, fc1[0]["key"], "reference", [1, 5]):  # the same graph, reference ops
        assert r["record"]["fused"] == {AG: 2, RS: 2}
        assert r["bytes"]["fused"] == r["bytes"]["unfused"] > 0
        assert all(c["rel"] <= 1e-12 for c in r["compare"])
    plain = pool.run(rank_capture, bundled_spec(num_hidden_layers=1), {"strategies": [], "lowering": "off"},
                     "float64", False)
    for r in pool.run(rank_lower, plain[0]["key"], "cuda"):
        assert r["record"]["fused"] == {}
        assert all(s["reason"].startswith("no fused matmul + all-reduce in torch symm_mem") for s in r["record"]["sites"])


def test_advisor_fused_kernels():
    """The advisor's fused-kernel estimate: overlap pays at prefill sizes, costs its overhead at T=1;
    cuda has no fused matmul + all-reduce, so vanilla TP is not listed there; bytes are not changed."""
    from fxpasses.advisor import Link, estimate, fused_estimates, load_model

    m, link = load_model("llama3-70b"), Link()
    big = {f.strategy: f for f in fused_estimates(m, 8, 4096, link, estimate(m, 8, 4096, link, [1]), "npu")}
    one = {f.strategy: f for f in fused_estimates(m, 8, 1, link, estimate(m, 8, 1, link, [1]), "npu")}
    assert set(big) == {"vanilla", "flashcomm1", "flashcomm2(K=1)", "flashcomm1+flashcomm2(K=1)"}
    assert [k for _, k, _, _ in big["vanilla"].pairs] == ["mm_all_reduce", "mm_all_reduce"]
    assert len(big["flashcomm1"].pairs) == 4 and len(big["flashcomm1+flashcomm2(K=1)"].pairs) == 3
    for name in big:
        assert big[name].saved_us > 0 and one[name].saved_us < 0
        assert 1 < big[name].break_even_tokens <= 4096
    cuda = {f.strategy for f in fused_estimates(m, 8, 4096, link, estimate(m, 8, 4096, link, [1]), "cuda")}
    assert "vanilla" not in cuda and "flashcomm2(K=1)" not in cuda and "flashcomm1" in cuda
