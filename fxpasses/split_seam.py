"""The seam in vLLM's backend that applies the piece-boundary contract (`fxpasses.piece_boundaries`)
before vLLM's FX split: `install()` wraps `vllm.compilation.backends.split_graph`, after checking
(`seam_problem`) that the installed vLLM calls it from `VllmBackend.__call__` with the signature
this code was written against; where it does not, the seam is not installed and a warning says
that pieces keep replicated boundaries. The wrapper finds the fxpasses pass of the compilation,
decides once for the model (every rank alike) and shards the boundaries; the decision is kept in
`piece_boundaries.LAST_DECISION`. A vLLM adapter: it sits above `fxpasses.vllm_pass`, which never
imports it.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch.fx as fx

from fxpasses import piece_boundaries as pb
from fxpasses.context import TPContext
from fxpasses.logs import bridge_logging
from fxpasses.vllm_pass import FxPassesInductorPass, find_vllm_config

log = logging.getLogger("fxpasses")

_ORIGINAL = None


def _fxpasses_pass(backend) -> Any:
    """The fxpasses pass this compilation runs: among the post-grad / platform passes of the backend's
    compilation config (else the current vLLM config's), looking inside chains (`passes`) and the
    vllm-ascend route's wrapper (`inner`); None when there is none."""
    cc = getattr(backend, "compilation_config", None)
    if cc is None:
        cc = getattr(find_vllm_config(), "compilation_config", None)
    icc = getattr(cc, "inductor_compile_config", None) or {}
    todo = list(icc.values()) if isinstance(icc, dict) else []
    while todo:
        p = todo.pop(0)
        if isinstance(p, FxPassesInductorPass):
            return p
        todo.extend(getattr(p, "passes", None) or [])
        if getattr(p, "inner", None) is not None:
            todo.append(p.inner)
    return None


def _decide_and_shard(backend, graph: fx.GraphModule, splitting_ops: list[str]) -> pb.Decision:
    from vllm.compilation.backends import should_split

    bridge_logging()
    pass_ = _fxpasses_pass(backend)
    if pass_ is None or not splitting_ops:
        return pb.Decision(False, "no fxpasses pass or no splitting ops")
    cfg = pass_.resolve_config()
    ctx = TPContext.from_vllm()
    T = pb.token_count_of(graph.graph)
    hidden, dtype_bytes = pb.model_facts(graph, T) if T is not None else (None, None)
    vc = getattr(backend, "vllm_config", None) or find_vllm_config()
    max_tokens = getattr(getattr(vc, "scheduler_config", None), "max_num_batched_tokens", None)
    d = pb.boundary_decision(cfg, ctx.tp, max_tokens=max_tokens, hidden=hidden, dtype_bytes=dtype_bytes)
    if not d.shard:
        return d
    if ctx.tp_group is None or not ctx.tp_group.vllm_name:
        return pb.Decision(False, "the TP group has no vLLM name for vllm.all_gather")
    try:
        count = pb.shard_boundaries(graph, lambda n: should_split(n, splitting_ops), ctx.tp, ctx.rank,
                                 ctx.tp_group.vllm_name)
    except Exception as e:  # the graph may be half rewritten: never compile that
        raise pb.BoundaryError(f"fxpasses: sharding the piece boundaries failed on TP rank {ctx.rank} "
                            f"({type(e).__name__}: {e}); set min_tokens to auto or >= 2 in the fxpasses config "
                            "to keep them replicated") from e
    return pb.Decision(bool(count), d.reason if count else "no token tensor crosses a piece boundary", count)


def split_graph_with_boundaries(graph, splitting_ops, *args, **kwargs):
    """`split_graph`, after the boundary contract was applied to the graph where it is decided."""
    import sys

    backend = sys._getframe(1).f_locals.get("self")
    try:
        d = _decide_and_shard(backend, graph, list(splitting_ops or []))
    except pb.BoundaryError:
        raise
    except Exception as e:  # deciding failed before the graph was touched: today's per-piece behaviour
        d = pb.Decision(False, f"the boundary decision failed ({type(e).__name__}: {e})")
        log.warning("fxpasses: %s; piece boundaries stay replicated", d.reason)
    pb.LAST_DECISION = d
    if d.shard:
        log.info("fxpasses: %d token tensors cross vLLM's piece boundaries sharded over the TP group (%s)",
                 d.boundaries, d.reason)
    else:
        log.info("fxpasses: piece boundaries stay replicated: %s", d.reason)
    return _ORIGINAL(graph, splitting_ops, *args, **kwargs)


def seam_problem() -> str | None:
    """Why the installed vLLM does not offer the seam this module wraps, or None."""
    try:
        from vllm.compilation import backends
    except Exception as e:  # no vLLM
        return f"vllm.compilation.backends cannot be imported ({type(e).__name__})"
    fn = getattr(backends, "split_graph", None)
    if fn is None:
        return "vllm.compilation.backends.split_graph is missing"
    params = list(inspect.signature(getattr(fn, "__wrapped__", fn)).parameters)
    if params[:2] != ["graph", "splitting_ops"]:
        return f"vllm.compilation.backends.split_graph takes {params}, not (graph, splitting_ops)"
    try:
        src = inspect.getsource(backends.VllmBackend.__call__)
    except (OSError, TypeError):
        return "the source of VllmBackend.__call__ is not readable"
    if "split_graph(" not in src:
        return "VllmBackend.__call__ no longer calls split_graph"
    return None


def install() -> bool:
    """Wrap vLLM's `split_graph` (once per process); False, with a warning, where the seam is missing."""
    global _ORIGINAL
    problem = seam_problem()
    if problem:
        log.warning("fxpasses: %s; FlashComm1 keeps replicated piece boundaries in VLLM_COMPILE mode", problem)
        return False
    from vllm.compilation import backends

    if getattr(backends.split_graph, "_fxpasses_seam", False):
        return True
    _ORIGINAL = backends.split_graph
    split_graph_with_boundaries._fxpasses_seam = True  # type: ignore[attr-defined]
    split_graph_with_boundaries.__wrapped__ = _ORIGINAL  # type: ignore[attr-defined]
    backends.split_graph = split_graph_with_boundaries
    return True
