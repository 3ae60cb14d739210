"""A rank that cannot follow its peers fails loudly. Verification is made to fail on TP rank 1 only
while the vLLM pass compiles the tiny model at TP=2: rank 1 raises a RewriteError naming its rank
and the cause (it never runs its original graph beside a rewritten rank 0); rank 0 rewrites."""
from __future__ import annotations

from helpers import bundled_spec


class _StopAfterCompile(Exception):
    """Raised after the pass on purpose: nobody runs a graph whose peer is missing."""


def rank_compile_with_vllm_pass(state, spec, bad_rank):
    from contextlib import nullcontext
    from unittest import mock

    import torch

    from fxpasses.errors import VerificationError
    from fxpasses.commands.tp_run.capture import compile_with_pass
    from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, build_tiny_decoder
    from fxpasses.vllm_pass import FxPassesInductorPass

    vllm_pass = FxPassesInductorPass(strategies=["flashcomm1"], min_tokens=0)  # forced: a rewrite must start
    model = build_tiny_decoder(DecoderSpec(**spec), dtype=torch.float32)
    seen = {}

    def on_graph(graph):
        vllm_pass(graph)
        seen["collectives"] = sorted({str(n.target) for n in graph.nodes if "c10d" in str(n.target)})
        raise _StopAfterCompile

    compiled, _ = compile_with_pass(model, on_graph)
    ids = torch.arange(5)
    torch._dynamo.mark_dynamic(ids, 0)
    injected = VerificationError("injected verification failure")
    with mock.patch("fxpasses.pipeline.verify", side_effect=injected) if state["rank"] == bad_rank \
            else nullcontext():
        try:
            compiled(ids)
        except Exception as e:  # Dynamo wraps backend errors; search the chain
            chain, cur = [], e
            while cur is not None:
                chain.append(f"{type(cur).__name__}: {cur}")
                cur = cur.__cause__ or cur.__context__
            stopped = any("_StopAfterCompile" in c for c in chain)
            return {"stopped_after_pass": stopped, "chain": chain, **seen}
    return {"stopped_after_pass": False, "chain": [], **seen}


def test_verification_failing_on_one_rank_is_loud(pools):
    pool = pools.get(2, "c10d")
    r0, r1 = pool.run(rank_compile_with_vllm_pass, bundled_spec(num_hidden_layers=1), 1)
    assert r0["stopped_after_pass"], r0["chain"][:3]
    assert any("reduce_scatter" in c for c in r0["collectives"]), r0  # rank 0 rewrote
    assert not r1["stopped_after_pass"], "rank 1 went on after its rewrite failed"
    text = "\n".join(r1["chain"])
    assert "RewriteError" in text and "TP rank 1" in text and "injected verification failure" in text, text
    assert "cannot keep its original" in text
