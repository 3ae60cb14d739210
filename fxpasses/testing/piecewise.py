"""vLLM's own VLLM_COMPILE path on CPU, as CUDA runs it: Dynamo, `VllmBackend`, `split_graph` at the
splitting ops, a `PiecewiseBackend` per piece compiling each compile range with Inductor, vLLM's
`PostGradPassManager` calling the fxpasses pass once per piece and range (cudagraph mode NONE).

`rank_compile_vllm(state, spec, config, graph_mode=...)` runs inside `TPPool` workers: it builds the
tiny decoder with its attention as the opaque `fxpasses_testing::causal_attention` op (the op the
graph is split at, as `vllm::unified_attention_with_output` is on CUDA), registers a recording
`FxPassesInductorPass` as `post_grad_custom_post_pass`, compiles, and keeps the compiled model next
to its eager twin (same weights) so `rank_compare_vllm` can compare them per token count.

Graph modes: "piecewise" (FX split at attention: vLLM's CUDA default), "whole" (`splitting_ops=[]`:
the post-grad pass sees the whole model, as with `use_inductor_graph_partition=True`).
The recipe's CPU adjustments (DEPLOYMENT.md section 2): the CPU platform turns VLLM_COMPILE into
DYNAMO_TRACE_ONCE (set back here), and `FixFunctionalizationPass` (CUDA-only `_C` ops) is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from fxpasses.commands.tp_run.harness import DTYPES, _tokens, compiled_against_eager
from fxpasses.commands.tp_run.attention_op import SPLITTING_OP
from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, build_tiny_decoder
from fxpasses.vllm_pass import FxPassesInductorPass, compile_range_of_current_pass

GRAPH_MODES = ("piecewise", "whole")


class RecordingPass(FxPassesInductorPass):
    """The real vLLM pass, remembering (compile range, report) of every call."""

    def __init__(self, rewrite_pieces: bool = True, **overrides: Any):
        super().__init__(**overrides)
        self.calls: list[dict] = []
        self.rewrite_pieces = rewrite_pieces  # False: only the piece-boundary seam acts (a refused piece)

    def __call__(self, graph) -> None:
        rng = compile_range_of_current_pass()
        report = self.apply(graph) if self.rewrite_pieces else None
        self.calls.append({"range": str(rng), "report": report.to_dict() if report is not None else None})


def vllm_compile_config(pass_: Any, graph_mode: str, endpoints: list[int] | None):
    """A VllmConfig for VLLM_COMPILE on CPU with `pass_` as the post-grad custom pass."""
    import dataclasses

    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode, PassConfig, VllmConfig

    if graph_mode not in GRAPH_MODES:
        raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.NONE,
                           splitting_ops=[SPLITTING_OP] if graph_mode == "piecewise" else [],
                           compile_sizes=[], compile_ranges_endpoints=endpoints, backend="inductor",
                           inductor_compile_config={"post_grad_custom_post_pass": pass_},
                           pass_config=PassConfig(**{f.name: False for f in dataclasses.fields(PassConfig)
                                                     if f.type in (bool, "bool")}))
    vc = VllmConfig(compilation_config=cc)
    vc.compilation_config.mode = CompilationMode.VLLM_COMPILE  # the CPU platform set DYNAMO_TRACE_ONCE
    return vc


@contextlib.contextmanager
def _cpu_adjustments():
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass

    original = FixFunctionalizationPass.__call__
    FixFunctionalizationPass.__call__ = lambda self, graph: None
    try:
        yield
    finally:
        FixFunctionalizationPass.__call__ = original


@contextlib.contextmanager
def _boundary_rows_of_the_next_rank():
    """Mutant: every rank hands the next rank's rows of a boundary value over (the shard offset off
    by one shard)."""
    from fxpasses import piece_boundaries

    original = piece_boundaries.shard_boundaries

    def mutated(graph, is_split, tp, rank, group_name):
        return original(graph, is_split, tp, (rank + 1) % tp, group_name)

    piece_boundaries.shard_boundaries = mutated
    try:
        yield
    finally:
        piece_boundaries.shard_boundaries = original


#: named mutants of the piece-boundary rewrite, patched from outside the library for one compile
MUTANTS = {"boundary_rows_of_the_next_rank": _boundary_rows_of_the_next_rank}


def rank_compile_vllm(state: dict, spec: dict, config: dict, graph_mode: str = "piecewise",
                      dtype: str = "float64", first_tokens: int = 7, endpoints: list[int] | None = None,
                      seed: int = 0, mutant: str | None = None, rewrite_pieces: bool = True) -> dict[str, Any]:
    """Compile the tiny decoder through vLLM's backend on this rank; returns the pass calls (compile
    range and site report per call), the number of pieces and the piece-boundary decision. `mutant`
    names an entry of `MUTANTS` applied while compiling; `rewrite_pieces=False` leaves every piece as
    the piece-boundary seam made it (the state of a piece whose rewrite was refused). Compile ranges are compiled lazily,
    on the first call of a size inside them. The rewrite is forced at every token count
    (`min_tokens: 0`) unless `config` names another `min_tokens`: these compiles check the rewrite."""
    from vllm.compilation.backends import VllmBackend

    from fxpasses import piece_boundaries, split_seam
    from fxpasses.config import FxPassesConfig
    from fxpasses.context import TPContext
    from fxpasses.worker_groups import prepare_process_groups

    config = {"min_tokens": 0, **config}
    key = f"vllm-{graph_mode}-{sorted(spec.items())}-{sorted(config.items())}-{dtype}-{endpoints}-{mutant}-{rewrite_pieces}"
    cache = state.setdefault("vllm_compiled", {})
    if key in cache:
        return cache[key]["summary"]
    # every piece and range compiled here, never served from an earlier run's cache (the pass must run)
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    torch._inductor.config.fx_graph_cache = False
    ds = DecoderSpec(**{**spec, "splitting_attention": True})
    prepare_process_groups(FxPassesConfig.from_dict(config), TPContext.from_vllm())  # at start-up
    split_seam.install()  # as the plugin does in every vLLM process
    model = build_tiny_decoder(ds, dtype=DTYPES[dtype], seed=seed)
    pass_ = RecordingPass(rewrite_pieces, **config)
    vc = vllm_compile_config(pass_, graph_mode, endpoints)
    torch._dynamo.reset()
    backend = VllmBackend(vc)
    # as vLLM's compile wrapper: no guards, so every later token count (1 included) runs the graph
    # traced for the first one, symbolic in T
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    entry = {"model": model, "compiled": compiled, "pass": pass_, "vc": vc, "backend": backend, "spec": ds,
             "key": key}
    cache[key] = entry
    with MUTANTS[mutant]() if mutant else contextlib.nullcontext():
        _run(entry, first_tokens, seed)  # compiles
    pieces = [it for it in backend.piecewise_graphs if not it.is_splitting_graph]
    d = piece_boundaries.LAST_DECISION
    entry["summary"] = {"key": key, "pieces": len(pieces), "calls": list(pass_.calls),
                        "boundaries": d.to_dict() if d is not None else None}
    return entry["summary"]


def _run(entry: dict, T: int, seed: int) -> torch.Tensor:
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    ids = _tokens(T, entry["spec"].vocab_size, seed)
    torch._dynamo.mark_dynamic(ids, 0)
    with torch.no_grad(), _cpu_adjustments(), set_current_vllm_config(entry["vc"]), \
            set_forward_context(None, entry["vc"]):
        return entry["compiled"](ids)


def rank_compare_vllm(state: dict, key: str, token_counts: list[int], seed: int = 0) -> dict[str, Any]:
    """Compiled (rewritten per piece) against the eager model on the same weights and tokens, per
    token count; also the pass calls made so far (new compile ranges compile on first use)."""
    entry = state["vllm_compiled"][key]
    out = compiled_against_eager(entry, token_counts, seed, _run)
    return {"results": out, "calls": list(entry["pass"].calls)}
