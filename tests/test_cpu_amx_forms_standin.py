"""vLLM CPU's AMX linear forms (`_C.weight_packed_linear` inside auto_functionalized,
`_C.int8_scaled_mm_with_quant`), recognised from `fxpasses.op_forms.vllm_cpu` and rewritten by
FlashComm1 on every CPU: the ops' real schemas with stand-in reference kernels
(`cpu_kernel_standin`), real gloo groups at TP=2 (both forms) and TP=4 (the int8 form), the stand-in shm all-reduce.

Shapes: one block of d=24, f=32 (qkv_proj/gate_up_proj column-sharded, o_proj/down_proj
row-sharded); TOKEN_SETS // 4 (5) token-count sets made from `examples(1)` drawn seeds (1, tp - 1,
tp, tp + 1, 3 tp + 1 and 3 to 6 counts in 1..300), float64: the rewritten graph equals the original to 1e-12 relative."""
import pytest
from hypothesis import given, settings

from cpu_kernel_standin import rank_run
from helpers import SEEDS, TOKEN_SETS, edge_counts, examples, token_sets


# both forms at TP=2, the int8 form (quantisation inside the matmul) at TP=4 too
FORMS = [(2, "packed", "weight_packed_linear"), (2, "int8", "int8_scaled_mm_with_quant"),
         (4, "int8", "int8_scaled_mm_with_quant")]


@pytest.mark.parametrize("tp,kernel,op", FORMS, ids=[f"{k}-{o}-{t}" for t, k, o in FORMS])
@settings(max_examples=examples(1))
@given(seed=SEEDS)
def test_amx_linear_forms_are_sites_and_flashcomm1_is_equivalent_standin(pools, tp, kernel, op, seed):
    for tokens in token_sets(seed, edge_counts(tp), n=TOKEN_SETS // 4):
        results = pools.get(tp, "c10d").run(rank_run, kernel, tokens)
        for res in results:
            assert all(e <= 1e-12 for e in res["errs"]), (tokens, res["errs"])
            rep = res["report"]
            assert rep["applied"], rep["reason"]
            assert f"_C.{op}" in res["before"]
            sites = {s["prefix"].rsplit(".", 1)[-1]: s for s in rep["sites"]}
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                assert sites[name]["matmul"] is not None, sites[name]   # the op is the layer's matmul
            assert sites["o_proj"]["status"] == sites["down_proj"]["status"] == "rewritten"
            gu = sites["gate_up_proj"]
            assert gu["status"] == "rewritten" and "all_gather" in gu["reason"], gu
            assert ("no int8 on the wire: _C.int8_scaled_mm_with_quant" in gu["reason"]) == (kernel == "int8"), gu
            assert rep["collectives_before"]["all_reduce"] == 2
            # 2 reduce_scatters; gathers before gate_up_proj and at the output (qkv_proj reads the input)
            assert rep["collectives_after"] == {"all_reduce": 0, "reduce_scatter": 2, "all_gather": 2,
                                                "all_to_all": 0}, rep["collectives_after"]
        assert len({r["report"]["fingerprint_digest"] for r in results}) == 1
