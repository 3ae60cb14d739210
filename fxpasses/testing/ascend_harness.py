"""The fxpasses pass on the simulated vllm-ascend compile path (`fxpasses.testing.ascend_standin`),
per rank, against the eager model.

Functions named `rank_*` run inside `TPPool` workers. `rank_ascend_compile` builds the tiny decoder
from real vLLM layers, registers `FxPassesAscendPass` with the stand-in `GraphFusionPassManager`,
compiles the model with `AscendStandinBackend` (whole graph, or pieces split at attention) for a
symbolic token count, and keeps it with the manager's record of calls; `rank_ascend_compare` runs
the compiled model and the eager model (same weights, same tokens) per token count.

For the piecewise mode the decoder's attention is one opaque custom op,
`fxpasses_testing::causal_attention` (`SPLITTING_OP`, `DecoderSpec.splitting_attention`), as vLLM's
attention is one op the graph is split at (`vllm::unified_attention_with_output` and vllm-ascend's
MLA/DSA twins). The compilation config vllm-ascend sets for the mode is current while compiling.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from fxpasses.commands.tp_run.harness import DTYPES, _tokens, compiled_against_eager
from fxpasses.commands.tp_run.attention_op import SPLITTING_OP

GRAPH_MODES = ("whole", "piecewise")


def build_model(spec: dict, dtype: str, seed: int, graph_mode: str):
    from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, build_tiny_decoder

    ds = DecoderSpec(**{**spec, "splitting_attention": graph_mode == "piecewise"})
    return ds, build_tiny_decoder(ds, dtype=DTYPES[dtype], seed=seed)


def ascend_vllm_config(graph_mode: str):
    """The compilation settings vllm-ascend's platform gives each mode (`_setup_compile_backend`):
    VLLM_COMPILE; piecewise modes split at attention, FULL modes get `splitting_ops=[]`."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode, VllmConfig

    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.NONE,
                           splitting_ops=[SPLITTING_OP] if graph_mode == "piecewise" else [])
    vc = VllmConfig(compilation_config=cc)
    vc.compilation_config.mode = CompilationMode.VLLM_COMPILE  # this CPU platform set DYNAMO_TRACE_ONCE
    return vc


def rank_ascend_compile(state: dict, spec: dict, config: dict, graph_mode: str = "whole",
                        dtype: str = "float64", first_tokens: int = 7, seed: int = 0,
                        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Compile the tiny decoder on this rank through the simulated vllm-ascend path with
    `FxPassesAscendPass(**config)`; returns the compiled pieces and the manager's calls. `env`:
    environment variables set while compiling (`FXPASSES_CONFIG`, the `VLLM_ASCEND_*` switches)."""
    with _environ(env or {}):
        return _ascend_compile(state, spec, config, graph_mode, dtype, first_tokens, seed, env or {})


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ascend_compile(state, spec, config, graph_mode, dtype, first_tokens, seed, env) -> dict[str, Any]:

    from fxpasses import piece_boundaries, split_seam
    from fxpasses.ascend_pass import FxPassesAscendPass
    from fxpasses.testing.piecewise import RecordingPass
    from fxpasses.context import TPContext
    from fxpasses.testing.ascend_standin import AscendStandinBackend, GraphFusionPassManagerStandin
    from fxpasses.worker_groups import prepare_process_groups

    if graph_mode not in GRAPH_MODES:
        raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
    config = {"min_tokens": 0, **config}  # the rewrite forced (see rank_compile_vllm)
    key = f"ascend-{graph_mode}-{sorted(spec.items())}-{sorted(config.items())}-{sorted(env.items())}-{dtype}-{seed}"
    cache = state.setdefault("ascend_compiled", {})
    if key in cache:
        return cache[key]["summary"]
    ds, model = build_model(spec, dtype, seed, graph_mode)
    vc = ascend_vllm_config(graph_mode)
    pass_ = FxPassesAscendPass(vc, inner=RecordingPass(**config))
    # where vllm-ascend's platform finds it (the plugin puts it there); the piece-boundary seam reads it
    vc.compilation_config.inductor_compile_config["graph_fusion_manager"] = pass_
    split_seam.install()
    prepare_process_groups(pass_.resolve_config(), TPContext.from_vllm())  # at start-up, not in the compile
    manager = GraphFusionPassManagerStandin()
    manager.configure(vc)
    manager.add(pass_)
    backend = AscendStandinBackend(manager, [SPLITTING_OP] if graph_mode == "piecewise" else [])
    torch._dynamo.reset()
    # as vLLM compiles (TorchCompileWithNoGuardsWrapper): dim 0 marked dynamic, every guard dropped, so
    # one graph serves every token count (no recompilation for other sizes)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    entry = {"model": model, "compiled": compiled, "manager": manager, "backend": backend, "spec": ds, "vc": vc}
    _run(entry, first_tokens, seed)  # compiles
    d = piece_boundaries.LAST_DECISION
    entry["summary"] = {"key": key, "pieces": list(backend.pieces), "calls": list(manager.calls),
                        "boundaries": d.to_dict() if d is not None else None,
                        "reports": [c["report"] for c in pass_.inner.calls]}
    cache[key] = entry
    return entry["summary"]


def _run(entry: dict, T: int, seed: int) -> torch.Tensor:
    from vllm.config import set_current_vllm_config

    ids = _tokens(T, entry["spec"].vocab_size, seed)
    torch._dynamo.mark_dynamic(ids, 0)
    with torch.no_grad(), set_current_vllm_config(entry["vc"]):
        return entry["compiled"](ids)


def rank_ascend_compare(state: dict, key: str, token_counts: list[int], seed: int = 0) -> dict[str, Any]:
    """Compiled (rewritten) against the eager model per token count; plus every manager call so far."""
    entry = state["ascend_compiled"][key]
    out = compiled_against_eager(entry, token_counts, seed, _run)
    return {"results": out, "calls": list(entry["manager"].calls), "pieces": list(entry["backend"].pieces)}


def rank_ascend_drop(state: dict, key: str) -> None:
    state.get("ascend_compiled", {}).pop(key, None)
    torch._dynamo.reset()
