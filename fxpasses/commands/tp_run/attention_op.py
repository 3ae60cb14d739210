"""The tiny decoder's attention as one opaque custom op, so vLLM's piecewise compilation has an op
to split the graph at (as it splits at `vllm::unified_attention_with_output` on CUDA and NPU).

`fxpasses_testing::causal_attention(q [T, nh, d], k [T, nkv, d], v [T, nkv, dv]) -> [T, nh, dv]`:
causal SDPA over the local heads (grouped-query when nh > nkv), with a fake kernel for tracing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SPLITTING_OP = "fxpasses_testing::causal_attention"


@torch.library.custom_op(SPLITTING_OP, mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1).contiguous()


@causal_attention.register_fake
def _(q, k, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, as_op: bool) -> torch.Tensor:
    """[T, nh, dv] attention output: through the splitting op, or inline SDPA (one graph)."""
    if as_op:
        return causal_attention(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)
