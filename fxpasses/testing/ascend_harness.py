"""The fxpasses pass on the simulated vllm-ascend compile path (`fxpasses.testing.ascend_standin`),
per rank, against the eager model.

Functions named `rank_*` run inside `TPPool` workers. `rank_ascend_compile` builds the tiny decoder
from real vLLM layers, registers `FxPassesAscendPass` with the stand-in `GraphFusionPassManager`,
compiles the model with `AscendStandinBackend` (whole graph, or pieces split at attention) for a
symbolic token count, and keeps it with the manager's record of calls; `rank_ascend_compare` runs
the compiled model and the eager model (same weights, same tokens) per token count.

For the piecewise mode the decoder's attention is one opaque custom op,
`fxpasses_ascend_standin::causal_attention` (`SPLITTING_OP`), as vLLM's attention is one op the
graph is split at (`vllm::unified_attention_with_output` and vllm-ascend's MLA/DSA twins).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F

from fxpasses.testing.harness import DTYPES, _tokens
from fxpasses.testing.models.tiny import Attention

SPLITTING_OP = "fxpasses_ascend_standin::causal_attention"
GRAPH_MODES = ("whole", "piecewise")


@torch.library.custom_op(SPLITTING_OP, mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[T, nh, d] x [T, nkv, d] x [T, nkv, dv] -> [T, nh, dv]: causal SDPA over the local heads."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1).contiguous()


@causal_attention.register_fake
def _(q, k, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


class SplitAttention(Attention):
    """The tiny decoder's attention with its core as `causal_attention` (same math, one op)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out, _ = self.o_proj(causal_attention(q, k, v).reshape(t, self.q_size))
        return out


def build_model(spec: dict, dtype: str, seed: int, graph_mode: str):
    from fxpasses.testing.models.tiny import DecoderSpec, build_tiny_decoder

    ds = DecoderSpec(**spec)
    model = build_tiny_decoder(ds, dtype=DTYPES[dtype], seed=seed)
    if graph_mode == "piecewise":
        for layer in model.layers:
            if type(layer.self_attn) is not Attention:
                raise TypeError("piecewise mode splits the tiny decoder's Attention, not "
                                f"{type(layer.self_attn).__name__}")
            layer.self_attn.__class__ = SplitAttention
    return ds, model


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
    from vllm.config import get_current_vllm_config

    from fxpasses.ascend_pass import FxPassesAscendPass
    from fxpasses.context import TPContext
    from fxpasses.testing.ascend_standin import AscendStandinBackend, GraphFusionPassManagerStandin
    from fxpasses.topology import prepare_process_groups

    if graph_mode not in GRAPH_MODES:
        raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
    key = f"ascend-{graph_mode}-{sorted(spec.items())}-{sorted(config.items())}-{sorted(env.items())}-{dtype}-{seed}"
    cache = state.setdefault("ascend_compiled", {})
    if key in cache:
        return cache[key]["summary"]
    ds, model = build_model(spec, dtype, seed, graph_mode)
    pass_ = FxPassesAscendPass(get_current_vllm_config(), **config)
    prepare_process_groups(pass_.resolve_config(), TPContext.from_vllm())  # at start-up, not in the compile
    manager = GraphFusionPassManagerStandin()
    manager.configure(get_current_vllm_config())
    manager.add(pass_)
    backend = AscendStandinBackend(manager, [SPLITTING_OP] if graph_mode == "piecewise" else [])
    torch._dynamo.reset()
    # as vLLM compiles (TorchCompileWithNoGuardsWrapper): dim 0 marked dynamic, every guard dropped, so
    # one graph serves every token count (no recompilation for other sizes)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    entry = {"model": model, "compiled": compiled, "manager": manager, "backend": backend, "spec": ds}
    _run(entry, first_tokens, seed)  # compiles
    entry["summary"] = {"key": key, "pieces": list(backend.pieces), "calls": list(manager.calls)}
    cache[key] = entry
    return entry["summary"]


def _run(entry: dict, T: int, seed: int) -> torch.Tensor:
    ids = _tokens(T, entry["spec"].vocab_size, seed)
    torch._dynamo.mark_dynamic(ids, 0)
    with torch.no_grad():
        return entry["compiled"](ids)


def rank_ascend_compare(state: dict, key: str, token_counts: list[int], seed: int = 0) -> dict[str, Any]:
    """Compiled (rewritten) against the eager model per token count; plus every manager call so far."""
    entry = state["ascend_compiled"][key]
    out = []
    for T in token_counts:
        got = _run(entry, T, seed)
        with torch.no_grad():
            ref = entry["model"](_tokens(T, entry["spec"].vocab_size, seed))
        ok = got.shape == ref.shape
        diff = (got.double() - ref.double()).abs().max().item() if ok else float("inf")
        out.append({"T": T, "shape_ok": ok, "max_abs": diff, "rel": diff / (ref.double().abs().max().item() or 1.0)})
    return {"results": out, "calls": list(entry["manager"].calls), "pieces": list(entry["backend"].pieces)}


def rank_ascend_drop(state: dict, key: str) -> None:
    state.get("ascend_compiled", {}).pop(key, None)
    torch._dynamo.reset()
