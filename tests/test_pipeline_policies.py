"""The pipeline's policies: min_tokens on graphs compiled for a fixed token count (real captures at
TP=2), strict mode raising, and a failed verification leaving the graph exactly as it was."""
from __future__ import annotations

from fractions import Fraction
from unittest import mock

import pytest
from torch._dispatch.python import enable_python_dispatcher

from fxpasses.config import FxPassesConfig
from fxpasses.errors import RewriteError, VerificationError
from fxpasses.pipeline import run_passes
from fxpasses.commands.tp_run.harness import rank_capture, rank_compare
from fxpasses.commands.tp_run.pool import RankError
from fxpasses.testing.synthetic_graphs import ModelShape, build_graph, tp_context
from helpers import bundled_spec, byte_ratio

LLAMA = ModelShape("tiny", 2, 256, 4, 2, 64, 512, 1000)


@pytest.mark.parametrize("T,applied", [(7, False), (16, True)])
def test_min_tokens_on_a_graph_compiled_for_a_fixed_size(pools, T, applied):
    pool = pools.get(2, "c10d")
    spec = bundled_spec(num_hidden_layers=1)
    summaries = pool.run(rank_capture, spec, {"strategies": ["flashcomm1"], "min_tokens": 8}, "float64", False,
                         first_tokens=T, seed=0, static=True)
    for s in summaries:
        rep = s["report"]
        assert rep["applied"] is applied, rep["reason"]
        if not applied:
            assert f"graph compiled for {T} tokens < min_tokens=8" in rep["reason"]
            assert rep["collectives_after"] == rep["collectives_before"] and "reduce_scatter" not in s["after"]
    for results in pool.run(rank_compare, summaries[0]["key"], [T]):
        (r,) = results
        assert r["shape_ok"] and r["rel"] <= 1e-12, r


def test_partials_reduced_elsewhere_are_not_skips_and_strict_refuses_real_skips(pools):
    # Qwen2-MoE's block: down_proj and the shared expert's down_proj have reduce_results=False; the
    # block's one all-reduce (a reduce site named after the block) is what FlashComm1 rewrites, so
    # the row layers are left alone with that reason, and strict mode has nothing to refuse
    pool = pools.get(2, "c10d")
    spec = bundled_spec(num_hidden_layers=1, shared_expert_intermediate_size=32, intermediate_size=64)
    for s in pool.run(rank_capture, spec, {"strategies": ["flashcomm1"], "strict": True}):
        by = {(x["prefix"], x["kind"]): x for x in s["report"]["sites"]}
        block = by[("model.layers.0.mlp", "reduce")]
        assert block["status"] == "rewritten" and "reduce_scatter" in block["reason"], block
        down = by[("model.layers.0.mlp.mlp.down_proj", "row")]
        assert down["status"] == "untouched", down
        assert "reduced by the all-reduce of model.layers.0.mlp" in down["reason"], down
        assert not [x for x in by.values() if x["status"] == "skipped"]
    # FlashComm2 alone cannot take a packed (oneDNN) o_proj weight: skipped, or refused when strict
    with pytest.raises(RankError, match="strict mode: sites could not be rewritten: model.layers.0.self_attn.o_proj"):
        pool.run(rank_capture, spec, {"strategies": ["flashcomm2"], "strict": True}, "float32", True)


def test_failed_verification_keeps_the_original_graph():
    with enable_python_dispatcher():
        gm = build_graph(LLAMA, 4)
        before = gm.graph.python_code("self").src
        with mock.patch("fxpasses.pipeline.verify", side_effect=VerificationError("injected")):
            rep = run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",)), tp_context(4))
        assert not rep.applied and "injected" in rep.reason
        assert gm.graph.python_code("self").src == before
        assert all(str(p.status) != "rewritten" for p in rep.sites)
        with mock.patch("fxpasses.pipeline.verify", side_effect=VerificationError("injected")), \
                pytest.raises(VerificationError, match="injected"):
            run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",), strict=True), tp_context(4))
        assert gm.graph.python_code("self").src == before
        # and the vLLM pass's policy: a failure on this rank is loud, naming the rank
        with mock.patch("fxpasses.pipeline.verify", side_effect=VerificationError("injected")), \
                pytest.raises(RewriteError, match="failed on TP rank 0"):
            run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",)), tp_context(4), fail_loudly=True)
        assert gm.graph.python_code("self").src == before


def test_a_rewrite_that_breaks_the_graph_is_refused_by_verification():
    """A real fault, not a mocked verifier: every all-gather keeps its padding rows (no unpad), so
    the graph's output has T_pad rows where the original has T. Verification (fake propagation of
    the rewritten graph against the original's output signature) must refuse it and keep the graph."""
    from fxpasses import rewriter

    real_gather = rewriter.LayoutRewriter.gather

    def gather_without_unpad(self, value):
        out = real_gather(self, value)
        for n in self.graph.nodes:
            if n.meta.get("fxpasses", {}).get("role") == "unpad" and n.args[3] is self.token_count_node():
                n.args = (*n.args[:3], self.padded_count()[1])
        return out

    with enable_python_dispatcher():
        gm = build_graph(LLAMA, 4)
        before = gm.graph.python_code("self").src
        with mock.patch.object(rewriter.LayoutRewriter, "gather", gather_without_unpad):
            rep = run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",)), tp_context(4))
    assert not rep.applied, "a rewrite with the wrong output rows was kept"
    assert "verif" in rep.reason.lower() or "shape" in rep.reason.lower(), rep.reason
    assert gm.graph.python_code("self").src == before


def test_a_site_flashcomm2_refuses_goes_to_flashcomm1(pools):
    # oneDNN-packed o_proj weights are invisible: FlashComm2 refuses them, FlashComm1 takes them, so
    # flashcomm1+flashcomm2 rewrites exactly what flashcomm1 alone does (never worse than its parts)
    pool = pools.get(2, "c10d")
    spec = bundled_spec(num_hidden_layers=2)
    both = pool.run(rank_capture, spec, {"strategies": ["flashcomm1", "flashcomm2"]}, "float32", True)
    alone = pool.run(rank_capture, spec, {"strategies": ["flashcomm1"]}, "float32", True)
    for s, a in zip(both, alone):
        o_proj = [x for x in s["report"]["sites"] if x["prefix"].endswith("o_proj")]
        assert len(o_proj) == 2
        for x in o_proj:
            assert x["strategy"] == "flashcomm1" and x["status"] == "rewritten", x
            assert x["reason"].startswith("flashcomm2 skipped it: the weight is not visible"), x
        assert s["report"]["collectives_after"] == a["report"]["collectives_after"]
        assert s["report"]["bytes_per_step"]["ratio"] == a["report"]["bytes_per_step"]["ratio"] <= 1.0
    for results in pool.run(rank_compare, both[0]["key"], [1, 3, 8]):
        assert all(r["shape_ok"] and r["rel"] <= 1e-5 for r in results), results


def test_an_abandoned_rewrite_still_writes_its_report_and_before_graph(tmp_path):
    with enable_python_dispatcher():
        gm = build_graph(LLAMA, 4)
        with mock.patch("fxpasses.pipeline.verify", side_effect=VerificationError("injected")):
            rep = run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",), dump_dir=str(tmp_path)),
                             tp_context(4), tag="g")
    assert not rep.applied
    out = tmp_path / "rank0"
    assert "def forward" in (out / "g.before.py").read_text()
    assert not (out / "g.after.py").exists()
    import json
    dumped = json.loads((out / "site_report.json").read_text())
    assert "injected" in dumped["reason"] and not dumped["applied"]
    assert dumped["sites"] and all(x["status"] != "rewritten" for x in dumped["sites"])


@pytest.mark.parametrize("T,applied", [(1, False), (5, False), (6, True)])
def test_a_static_graph_whose_padding_costs_bytes_is_kept_as_it_was(pools, T, applied):
    # a graph compiled for T tokens (a decode or cudagraph size): FlashComm1 pads T to a multiple of
    # tp, so for T % tp != 0 its reduce-scatters and all-gathers move T_pad rows where the all-reduces
    # moved T: more bytes, refused; for T % tp == 0 it moves exactly the same, kept
    pool = pools.get(2, "c10d")
    spec = bundled_spec(num_hidden_layers=1)
    for s in pool.run(rank_capture, spec, {"strategies": ["flashcomm1"]}, "float64", False, first_tokens=T, seed=0,
                      static=True):
        rep = s["report"]
        assert rep["applied"] is applied, rep["reason"]
        assert rep["bytes_per_step"]["tokens"] == T
        if applied:
            assert byte_ratio(rep) == 1, rep["bytes_per_step"]
        else:
            assert "bytes per step" in rep["reason"]
            assert byte_ratio(rep) == Fraction((T + 1) // 2 * 2, T), rep["bytes_per_step"]
            assert rep["collectives_after"] == rep["collectives_before"]
