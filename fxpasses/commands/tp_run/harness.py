"""Equivalence harness: trace a model once per shape on every rank, rewrite it, and compare the
rewritten graph with the original graph on the same weights and inputs for many token counts.

Functions named `rank_*` run inside `TPPool` workers (`pool.run(rank_capture, ...)`); they keep
their captured graphs in the worker's state, so one capture (with a symbolic token count) serves
every token count that follows. Used by the demo, the `fxpasses dump` CLI and the tests.
"""
from __future__ import annotations

import hashlib
import json
import pkgutil
from dataclasses import dataclass
from typing import Any

import torch

from fxpasses.commands.tp_run.capture import compile_with_pass, rebind_token_args
from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, build_tiny_decoder
from fxpasses.config import FxPassesConfig
from fxpasses.context import TPContext
from fxpasses.dump import graph_text
from fxpasses.pipeline import run_passes
from fxpasses.worker_groups import prepare_process_groups

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CaptureOptions:
    """How `rank_capture` builds and compiles its model (its keyword arguments).

    `first_tokens`: the token count of the compiling call; `static=True` compiles for exactly that
    count (no symbolic token count), as vLLM does for a compile size. `seed`: the weights' and
    tokens' seed. `builder` / `builder_kwargs`: another model than the tiny decoder ("module:function",
    called as fn(spec, dtype=, seed=, **builder_kwargs)). `pre_pass` ("module:function"): run on the
    post-grad graph before fxpasses, as a platform's own passes run before it (vllm-ascend's fusions);
    `before` is then their result."""

    first_tokens: int = 7
    seed: int = 0
    static: bool = False
    builder: str = ""
    builder_kwargs: dict | None = None
    pre_pass: str = ""


def capture_key(spec: dict, config: dict, dtype: str, pack: bool, opts: CaptureOptions = CaptureOptions()) -> str:
    parts = [spec, config, dtype, pack] + ([opts.builder, opts.builder_kwargs or {}] if opts.builder else [])
    parts += [opts.pre_pass] if opts.pre_pass else []
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _build(ds: DecoderSpec, dtype: str, pack: bool, opts: CaptureOptions):
    """The tiny decoder, or the model `opts.builder` builds, e.g. the NPU-form decoder
    `fxpasses.testing.models.npu_tiny:build_npu_decoder`."""
    if not opts.builder:
        return build_tiny_decoder(ds, dtype=DTYPES[dtype], seed=opts.seed, pack_weights=pack)
    return pkgutil.resolve_name(opts.builder)(ds, dtype=DTYPES[dtype], seed=opts.seed, **(opts.builder_kwargs or {}))


def _tokens(T: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed * 7919 + T))


def rank_capture(state: dict, spec: dict, config: dict, dtype: str = "float64", pack: bool = False,
                 **options) -> dict[str, Any]:
    """Build the model on this rank, compile it once with the pass, return the report and graphs.
    `options`: the fields of `CaptureOptions`."""
    opts = CaptureOptions(**options)
    key = capture_key(spec, config, dtype, pack, opts) + (f"-static{opts.first_tokens}" if opts.static else "")
    cache = state.setdefault("captures", {})
    if key in cache:
        return cache[key]["summary"]
    ds = DecoderSpec(**spec)
    cfg = FxPassesConfig.from_dict(config)
    model = _build(ds, dtype, pack, opts)
    ctx = TPContext.from_vllm()
    prepare_process_groups(cfg, ctx)  # collective group creation before compiling, not inside it
    reports = []
    compiled, cap = compile_with_pass(model, lambda g: reports.append(
        run_passes(g, cfg, ctx, tag=f"graph{len(reports)}")), dynamic=not opts.static,
        pre=pkgutil.resolve_name(opts.pre_pass) if opts.pre_pass else None)
    ids0 = _tokens(opts.first_tokens, ds.vocab_size, opts.seed)
    if not opts.static:
        torch._dynamo.mark_dynamic(ids0, 0)
    with torch.no_grad():
        compiled(ids0)
    if len(cap.graphs) != 1:
        raise RuntimeError(f"expected one captured graph, got {len(cap.graphs)} (graph breaks?)")
    summary = {"key": key, "report": reports[0].to_dict(), "before": graph_text(cap.originals[0]),
               "after": graph_text(cap.graphs[0])}
    # the model stays alive with its graphs: packed (oneDNN) weights are handles the module owns
    cache[key] = {"cap": cap, "ids0": ids0, "spec": ds, "summary": summary, "model": model}
    return summary


def graph_args(state: dict, key: str, T: int, seed: int = 0, ids: torch.Tensor | None = None):
    """The capture of `key` on this rank and its graphs' flat args for a T-token input
    (`ids` if given, else the harness's seeded tokens)."""
    entry = state["captures"][key]
    cap = entry["cap"]
    ids = ids if ids is not None else _tokens(T, entry["spec"].vocab_size, seed)
    return cap, rebind_token_args(cap.first_args, entry["ids0"], ids)


def error_record(ref: torch.Tensor, new: torch.Tensor, T: int) -> dict[str, float]:
    """Shape check and max abs / relative (to ref's largest magnitude) error of `new` against `ref`."""
    if ref.shape != new.shape:
        return {"T": T, "shape_ok": False, "max_abs": float("inf"), "rel": float("inf")}
    diff = (new.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item() or 1.0
    return {"T": T, "shape_ok": True, "max_abs": diff, "rel": diff / scale}


def compare_outputs(cap, args, T: int) -> dict[str, float]:
    """Run the original and the rewritten graph on `args`; shape check and max abs / relative error."""
    return error_record(cap.originals[0](*list(args))[0], cap.graphs[0](*list(args))[0], T)


def compiled_against_eager(entry: dict, token_counts: list[int], seed: int, run) -> list[dict[str, float]]:
    """`run(entry, T, seed)` (a compiled model) against `entry["model"]` run eagerly on the same
    tokens, one `error_record` per token count."""
    out = []
    for T in token_counts:
        got = run(entry, T, seed)
        with torch.no_grad():
            ref = entry["model"](_tokens(T, entry["spec"].vocab_size, seed))
        out.append(error_record(ref, got, T))
    return out


def rank_compare(state: dict, key: str, token_counts: list[int], seed: int = 0) -> list[dict[str, float]]:
    """Run original and rewritten graphs on the same inputs for each token count."""
    with torch.no_grad():
        return [compare_outputs(*graph_args(state, key, T, seed), T) for T in token_counts]


def rank_drop(state: dict, key: str) -> None:
    state.get("captures", {}).pop(key, None)
    torch._dynamo.reset()
