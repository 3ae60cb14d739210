"""The `auto_functionalized(_C.shm_allreduce)` all-reduce form (vLLM's CPU default), traced from the
op's real schema with a stand-in gloo kernel (AVX2 builds have no shm op; AVX-512 builds have one,
but the test pool has no shared-memory handle for it)."""
from shm_standin import rank_run


def test_shm_allreduce_form_is_rewritten_and_equivalent_standin_op(pools):
    results = pools.get(2, "c10d").run(rank_run, [1, 2, 5, 64, 301])
    for res in results:
        rep = res["report"]
        assert rep["applied"], rep["reason"]
        (site,) = rep["sites"]
        assert site["prefix"] == "model.layers.0.self_attn.o_proj" and site["all_reduce"] == "shm"
        assert site["status"] == "rewritten"
        assert rep["collectives_before"]["all_reduce"] == 1
        assert rep["collectives_after"] == {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 1, "all_to_all": 0}
        assert max(res["errs"]) <= 1e-12, res["errs"]
    assert len({res["report"]["fingerprint_digest"] for res in results}) == 1
