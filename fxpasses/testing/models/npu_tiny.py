"""A tiny decoder whose traced graph holds vllm-ascend's NPU op forms (test support).

Built like `tiny.py` from real vLLM TP layers (VocabParallelEmbedding, QKVParallelLinear,
RowParallelLinear, MergedColumnParallelLinear: their classes, prefixes, weight loaders and TP
all-reduce), with each linear layer's `quant_method` replaced by vllm-ascend's choice of ops, as
vllm-ascend's own linear methods do it:

* float (`quant="none"`): `vllm.unquantized_gemm(x, weight, bias)` (AscendUnquantizedLinearMethod);
* W8A8 static (`quant="w8a8"`): `vllm.quantize(x, input_scale, input_scale_reciprocal, offset)`
  then `npu.npu_quant_matmul(x, weight_int8 [in, out], deq_scale, output_dtype=...)`;
* W8A8 dynamic (`quant="w8a8_dynamic"`): `npu.npu_dynamic_quant(x)` then
  `npu.npu_quant_matmul(..., pertoken_scale=scale, output_dtype=...)`.

Norms, activation and rotary embedding are vllm-ascend's forms: `npu.npu_rms_norm` (first layer's
input norm), `npu.npu_add_rms_norm` (residual add + norm), `_C_ascend.npu_add_rms_norm_bias` (the
post-attention norm, with a beta), `npu.npu_swiglu`, `vllm.npu_rotary_embedding` (neox or GPT-J
style) on positions `arange(T)`; with the spec's `qk_norm`, per-head `npu.npu_rms_norm`s of q and k
before it (Qwen3; what vllm-ascend's fuse_qknorm_rope turns into `vllm.qkv_rmsnorm_rope`). With `moe_reduce` the odd layers' MLP ends like vllm-ascend's MoE
block: `down_proj(reduce_results=False)` then `vllm.maybe_pad_and_reduce` (a TP all-reduce with
FlashComm off). The ops come from `fxpasses.testing.npu_standin`. Weights are seeded and
identical on every rank before sharding; quantised weights are per-output-channel int8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, SeededWeights
from fxpasses.testing.npu_standin import ensure_npu_standin_ops

QUANTS = ("none", "w8a8", "w8a8_dynamic")
STATIC_INPUT_SCALE = 0.03     # W8A8 static: per-tensor activation scale (offset 0)


class NPUUnquantizedLinearMethod:
    def apply(self, layer, x, bias=None):
        return torch.ops.vllm.unquantized_gemm(x, layer.weight, bias)


class NPUW8A8StaticLinearMethod:
    def apply(self, layer, x, bias=None):
        q = torch.ops.vllm.quantize(x, layer.aclnn_input_scale, layer.aclnn_input_scale_reciprocal,
                                    layer.aclnn_input_offset)
        return torch.ops.npu.npu_quant_matmul(q, layer.weight, layer.deq_scale, bias=bias, output_dtype=x.dtype)


class NPUW8A8DynamicLinearMethod:
    def apply(self, layer, x, bias=None):
        q, scale = torch.ops.npu.npu_dynamic_quant(x)
        return torch.ops.npu.npu_quant_matmul(q, layer.weight, layer.weight_scale, pertoken_scale=scale,
                                              bias=bias, output_dtype=x.dtype)


def _quantize_layer(layer: nn.Module, quant: str, scale_spread: float = 0.0) -> None:
    """This rank's float weight shard [out, in] -> int8 [in, out] with per-output-channel scales.
    `scale_spread` (static W8A8, test-only): the per-input-channel quantisation vectors vary by
    +-spread around the per-tensor scale (vllm-ascend repeats one value), so a rewrite that slices
    them to the wrong channels changes the result; the dequant scale keeps the per-tensor value,
    so such a model is consistent, not a faithful W8A8 model."""
    w = layer.weight.data.double()
    w_scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    wq = torch.round(w / w_scale.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    layer.weight = nn.Parameter(wq.t().contiguous(), requires_grad=False)
    if quant == "w8a8":
        n_in = wq.shape[1]
        s = STATIC_INPUT_SCALE * (1.0 + scale_spread * torch.cos(torch.arange(n_in, dtype=torch.float64)))
        s = s.float()
        layer.aclnn_input_scale = nn.Parameter(s, requires_grad=False)
        layer.aclnn_input_scale_reciprocal = nn.Parameter(1.0 / s, requires_grad=False)
        layer.aclnn_input_offset = nn.Parameter(torch.zeros(n_in, dtype=torch.float32), requires_grad=False)
        layer.deq_scale = nn.Parameter((STATIC_INPUT_SCALE * w_scale).float(), requires_grad=False)
        layer.quant_method = NPUW8A8StaticLinearMethod()
    else:
        layer.weight_scale = nn.Parameter(w_scale.float(), requires_grad=False)
        layer.quant_method = NPUW8A8DynamicLinearMethod()


class NPURMSNorm(nn.Module):
    """AscendRMSNorm.forward_oot's ops: npu_rms_norm without a residual, npu_add_rms_norm (or the
    custom `_C_ascend.npu_add_rms_norm_bias` with a beta) with one."""

    def __init__(self, hidden: int, eps: float, with_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden), requires_grad=False) if with_bias else None
        self.eps = eps

    def forward(self, x, residual=None):
        if residual is None:
            y, _ = torch.ops.npu.npu_rms_norm(x, self.weight, self.eps)
            return y
        if self.bias is not None:
            y, _, residual = torch.ops._C_ascend.npu_add_rms_norm_bias(x, residual, self.weight, self.bias, self.eps)
        else:
            y, _, residual = torch.ops.npu.npu_add_rms_norm(x, residual, self.weight, self.eps)
        return y, residual


def _cos_sin_cache(rotary_dim: int, max_pos: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


class NPUAttention(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str, neox: bool, max_pos: int):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        tp = get_tensor_model_parallel_world_size()
        self.head_dim, self.neox = spec.head_dim, neox
        self.num_heads = spec.num_attention_heads // tp
        self.num_kv_heads = max(1, spec.num_key_value_heads // tp)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_attention_heads,
                                          spec.num_key_value_heads, bias=spec.qkv_bias, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(spec.num_attention_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_proj_bias, prefix=f"{prefix}.o_proj")
        self.register_buffer("cos_sin_cache", _cos_sin_cache(spec.head_dim, max_pos), persistent=False)
        self.qk_norm, self.eps = spec.qk_norm, spec.rms_norm_eps
        if spec.qk_norm:  # Qwen3's per-head RMS norms of q and k before the rope
            self.q_norm = nn.Parameter(torch.ones(spec.head_dim), requires_grad=False)
            self.k_norm = nn.Parameter(torch.ones(spec.head_dim), requires_grad=False)

    def forward(self, positions, hidden):
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # the ops vllm-ascend's fuse_qknorm_rope matches (with the rope below)
            t = qkv.shape[0]
            q, _ = torch.ops.npu.npu_rms_norm(q.reshape(t, self.num_heads, self.head_dim), self.q_norm, self.eps)
            k, _ = torch.ops.npu.npu_rms_norm(k.reshape(t, self.num_kv_heads, self.head_dim), self.k_norm, self.eps)
            q, k = q.reshape(t, self.q_size), k.reshape(t, self.kv_size)
        q, k = torch.ops.vllm.npu_rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim,
                                                   self.head_dim, self.neox)
        t = q.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        out, _ = self.o_proj(out.transpose(0, 1).reshape(t, self.q_size))
        return out


class NPUMLP(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str, moe_reduce: bool):
        super().__init__()
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [spec.intermediate_size] * 2,
                                                       bias=spec.mlp_bias, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias,
                                           reduce_results=not moe_reduce, prefix=f"{prefix}.down_proj")
        self.moe_reduce = moe_reduce

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(torch.ops.npu.npu_swiglu(gate_up))
        return torch.ops.vllm.maybe_pad_and_reduce(out) if self.moe_reduce else out


class NPUDecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str, neox: bool, max_pos: int, moe_reduce: bool):
        super().__init__()
        self.input_layernorm = NPURMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = NPUAttention(spec, f"{prefix}.self_attn", neox, max_pos)
        self.post_attention_layernorm = NPURMSNorm(spec.hidden_size, spec.rms_norm_eps, with_bias=True)
        self.mlp = NPUMLP(spec, f"{prefix}.mlp", moe_reduce)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class NPUDecoder(nn.Module):
    """The compiled module (vLLM's `model.`): input ids [T] -> final hidden states [T, H]."""

    prefix = "model"

    def __init__(self, spec: DecoderSpec, neox: bool = True, max_pos: int = 512, moe_reduce: bool = True):
        super().__init__()
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   prefix=f"{self.prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            NPUDecoderLayer(spec, f"{self.prefix}.layers.{i}", neox, max_pos, moe_reduce and i % 2 == 1)
            for i in range(spec.num_hidden_layers))
        self.norm = NPURMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def build_npu_decoder(spec: DecoderSpec, *, dtype: torch.dtype = torch.float64, seed: int = 0, quant: str = "none",
                      neox: bool = True, moe_reduce: bool = True, max_pos: int = 512,
                      scale_spread: float = 0.0) -> NPUDecoder:
    """Build the model on this rank (after vLLM's model-parallel groups exist), weights seeded and
    sharded by vLLM's loaders, then each linear routed to the NPU ops of `quant` (see the module
    docstring)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    ensure_npu_standin_ops()
    spec.check_tp(get_tensor_model_parallel_world_size())
    with torch.device("cpu"):
        model = NPUDecoder(spec, neox=neox, max_pos=max_pos, moe_reduce=moe_reduce).to(dtype)
    sw = SeededWeights(spec, dtype, seed)
    rnd, h = sw.rnd, spec.hidden_size

    sw.load(model.embed_tokens.weight, rnd(spec.vocab_size, h, scale=1.0))
    for layer in model.layers:
        sw.attention(layer.self_attn)
        sw.mlp(layer.mlp, spec.intermediate_size)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.copy_(1.0 + rnd(h, scale=0.1))
        layer.post_attention_layernorm.bias.data.copy_(rnd(h, scale=0.1))
    model.norm.weight.data.copy_(1.0 + rnd(h, scale=0.1))
    if spec.qk_norm:  # drawn last: the other weights are the same with or without q/k norms
        for layer in model.layers:
            for w in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                w.data.copy_(1.0 + rnd(spec.head_dim, scale=0.1))

    for mod in model.modules():
        if hasattr(mod, "quant_method") and hasattr(mod, "weight") and mod.weight.ndim == 2 \
                and not hasattr(mod, "num_embeddings_padded"):
            if quant == "none":
                mod.quant_method = NPUUnquantizedLinearMethod()
            else:
                _quantize_layer(mod, quant, scale_spread)
    return model.eval()
