"""OTP on W8A8-quantised o_proj, int8 on the wire (NPU stand-ins: vllm-ascend's `vllm.quantize`,
`npu.npu_dynamic_quant`, `npu.npu_quant_matmul`; `fxpasses.testing.npu_standin`).

DP-attention graphs: every rank runs the TP=1 graph of the NPU-form decoder
(`fxpasses.testing.models.npu_tiny`, `moe_reduce=False`, `weight_format: nd`) on its OWN tokens.
OTP keeps the graph's quantisation of the o_proj input before its all_to_all, which moves the int8
column blocks (dynamic: each block with its token's float32 scale as 4 more int8 columns), then
multiplies them with this rank's int8 weight rows and reduce-scatters.

* Exact for static and dynamic W8A8: the int8 values and per-token scales are the TP=1 graph's
  (quantised over all D features before the exchange), integer products are exact in float64, so
  the only difference is the order of the K partial sums: rel <= 1e-12 against each rank's own
  TP=1 output. A block sent to the wrong peer, a wrong weight slice or a scale of another token
  changes the output by O(1) of its magnitude.
* Structure: per o_proj one all_to_all with an int8 input and one reduce_scatter, nothing else.
* Bytes (`fxpasses.comm_volume`) against the bf16 all_to_all of the float path (the tiny aten
  decoder, same D = 64): static 1/2; dynamic (D/K + 4) / (2 D/K): 9/16 at K = 2, 5/8 at K = 4.
* `int8_comm: off` skips the site with that reason.
"""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings

from fxpasses.commands.tp_run.dp_harness import rank_compare_own_tokens
from fxpasses.commands.tp_run.harness import rank_capture
from helpers import SEEDS, bundled_spec, edge_counts, examples, token_sets

BUILDER = "fxpasses.testing.models.npu_tiny:build_npu_decoder"
D = 64   # the bundled spec: 4 heads x 16

# id: (world, otp_size (0 = world), quant, o_proj bias, strategies)
CASES = {
    "w2-static-bias": (2, 0, "w8a8", True, ("otp",)),
    "w2-dynamic": (2, 0, "w8a8_dynamic", False, ("otp",)),
    "w4-K4-dynamic-bias": (4, 0, "w8a8_dynamic", True, ("otp",)),
    "w4-K2-static-with-mlp": (4, 2, "w8a8", False, ("otp", "mlp_tp")),
}


def _capture(pool, quant, bias, k=0, strategies=("otp",), dtype="float64", **cfg):
    config = {"strategies": list(strategies), "weight_format": "nd", "otp_size": k, "mlp_tp_size": k, **cfg}
    spec = bundled_spec(num_hidden_layers=1, o_proj_bias=bias)
    return pool.run(rank_capture, spec, config, dtype, False, builder=BUILDER,
                    builder_kwargs={"quant": quant, "moe_reduce": False})


def rank_collectives(state, key, kind):
    """(input dtype, send bytes at 4096 tokens per rank) of each per-step `kind` collective."""
    from fxpasses import comm_volume
    from fxpasses import graph_forms as gf

    g = state["captures"][key]["cap"].graphs[0].graph
    subs = {s: 4096 for s in comm_volume.token_symbols(g)}
    byname = {n.name: n for n in g.nodes}
    return [(str(gf.val(gf.collective_input(byname[v.node])).dtype).removeprefix("torch."), int(v.at(subs)["send"]))
            for v in comm_volume.collective_volumes(g, default_group_size=1) if v.kind == kind and not v.one_time]


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_otp_int8_equals_tp1_standin(dp_pools, case, seed):
    """Each case of CASES (the bundled shape cut to 1 layer, GQA 2), on examples(3) token-count sets
    made from each drawn seed: 1, world - 1, world, world + 1, 3 world + 1 and 3 to 6 counts in
    1..160, equal on every rank."""
    world, k, quant, bias, strategies = CASES[case]
    pool = dp_pools(world)
    summaries = _capture(pool, quant, bias, k, strategies)
    for s in summaries:
        otp = [x for x in s["report"]["sites"] if x["strategy"] == "otp"]
        assert [x["status"] for x in otp] == ["rewritten"], otp
        assert "int8 all_to_all" in otp[0]["reason"]
        assert ("per-token float32 scale" in otp[0]["reason"]) == (quant == "w8a8_dynamic")
    key = summaries[0]["key"]
    a2a = pool.run(rank_collectives, key, "all_to_all")
    rs = pool.run(rank_collectives, key, "reduce_scatter")
    for r in range(world):
        assert [c[0] for c in a2a[r]] == ["int8"], a2a[r]
        assert len(rs[r]) == 1 + (len(strategies) - 1), rs[r]     # o_proj's (+ the MLP's)
    for counts in token_sets(seed, edge_counts(world), hi=160, n=examples(3)):
        for per_rank in pool.run(rank_compare_own_tokens, key, counts):
            assert [res["T"] for res in per_rank] == counts
            for res in per_rank:
                assert res["shape_ok"] and res["rel"] <= 1e-12, (case, counts, res)


def test_otp_int8_bytes_against_bf16_standin(dp_pools):
    pool = dp_pools(4)
    for k, want_dyn in ((2, Fraction(D // 2 + 4, D)), (4, Fraction(D // 4 + 4, D // 2))):
        spec = bundled_spec(num_hidden_layers=1)
        flt = pool.run(rank_capture, spec, {"strategies": ["otp"], "otp_size": k}, "bfloat16", False)
        base = pool.run(rank_collectives, flt[0]["key"], "all_to_all")[0]
        assert [c[0] for c in base] == ["bfloat16"], base
        for quant, want in (("w8a8", Fraction(1, 2)), ("w8a8_dynamic", want_dyn)):
            got = pool.run(rank_collectives, _capture(pool, quant, False, k)[0]["key"], "all_to_all")[0]
            assert [c[0] for c in got] == ["int8"] and Fraction(got[0][1], base[0][1]) == want, (k, quant, got, base)


def test_int8_comm_off_skips_quantised_o_proj_standin(dp_pools):
    summaries = _capture(dp_pools(2), "w8a8_dynamic", False, int8_comm="off")
    for s in summaries:
        rep = s["report"]
        otp = [x for x in rep["sites"] if x["strategy"] == "otp"]
        assert len(otp) == 1 and otp[0]["status"] == "skipped" and "int8_comm='off'" in otp[0]["reason"], otp
        assert rep["collectives_after"] == rep["collectives_before"]
