"""A decoder (Llama / Mistral / Qwen2 / Qwen3 shapes, and the MoE, MLA and parallel-residual
variants below) built from real vLLM TP layers.

VocabParallelEmbedding -> N x [RMSNorm, QKVParallelLinear, causal SDPA over the local heads,
RowParallelLinear o_proj, fused-residual RMSNorm, MergedColumnParallelLinear gate_up + SiluAndMul,
RowParallelLinear down_proj] -> final RMSNorm. With `shared_expert_intermediate_size` the MLP is
shaped like Qwen2-MoE's block (a dense stand-in for the routed experts): its down_proj does not
reduce (`reduce_results=False`), a gated shared expert (MergedColumnParallelLinear +
RowParallelLinear with `reduce_results=False`, scaled by sigmoid of a ReplicatedLinear gate) is
added to it, and one TP all-reduce ends the block. With `num_experts` the block's dense MLP is
replaced by routed experts: a ReplicatedLinear router, softmax and top-k outside the experts (as
vLLM's CPU path has them), then `TinyExperts`, a plain module holding this rank's shard of every
expert's weights (a dense CPU reference of a fused MoE kernel, unknown to the default pattern set:
whatever fxpasses cannot classify must still be rewritten soundly). With `kv_lora_rank` the
attention is shaped like DeepSeek's MLA: a `MergedColumnParallelLinear(disable_tp=True)` latent
down-projection, latent RMSNorms, q_b/kv_b ColumnParallelLinear up-projections, a
`reshape(T, 1, -1)` of the rope key and causal SDPA. With `parallel_residual` (Cohere) attention
and MLP read the same normed input, neither reduces, and one all-reduce of their sum ends the
layer. With `batch_of_one` every activation carries a leading batch dim of one ([1, T] ids,
[1, T, H] hidden states, as vLLM's Transformers backend runs Hugging Face modules): the token dim
is dim 1. Weights are random (seeded, identical on every rank
before sharding), nothing is downloaded. Must be built after vLLM's model-parallel groups exist.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxpasses.errors import ConfigError
from fxpasses.commands.tp_run.attention_op import attend

BUNDLED_CONFIG = Path(__file__).with_name("tiny_llama.json")


@dataclass(frozen=True)
class DecoderSpec:
    """The few fields of an HF config.json that shape a dense decoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    model_type: str = "llama"
    num_experts: int = 0                 # routed experts (needs shared_expert_intermediate_size)
    num_experts_per_tok: int = 2
    kv_lora_rank: int = 0                # MLA attention when > 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    parallel_residual: bool = False
    splitting_attention: bool = False    # attention as one custom op vLLM can split the graph at
    batch_of_one: bool = False           # [1, T, H] activations (vLLM's Transformers-backend layout)
    learned_positions: int = 0           # > 0: GPT-2 / OPT's position table of this many rows, replicated
                                         # on every rank, added to the token embedding

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "DecoderSpec":
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise ConfigError(f"model config lacks {missing}; a dense decoder config.json "
                              "(Llama, Mistral, Qwen2, Qwen3) has them")
        if cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts"):
            raise ConfigError("MoE configs are not supported by the tiny-model builder; "
                              "give a dense decoder config")

        def num(key, default=None):
            v = cfg.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"model config: {key} must be a non-negative number, got {v!r}")
            return v

        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            num(key)
        for key in ("num_key_value_heads", "head_dim"):
            if cfg.get(key) is not None:
                num(key)
        mt = str(cfg.get("model_type", "llama"))
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=attention_bias or mt == "qwen2",
            o_proj_bias=attention_bias and mt not in ("qwen2", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            model_type=mt,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "DecoderSpec":
        try:
            cfg = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"model config {path} is a directory; give its config.json") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"model config {path} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model config {path} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"model config {path} holds a {type(cfg).__name__}, not an HF config object")
        return cls.from_hf_config(cfg)

    def replace(self, **kw) -> "DecoderSpec":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return DecoderSpec(**d)

    def check_tp(self, tp: int) -> None:
        for name, val in (("num_attention_heads", self.num_attention_heads),
                          ("intermediate_size", self.intermediate_size),
                          ("shared_expert_intermediate_size", self.shared_expert_intermediate_size),
                          ("vocab_size", self.vocab_size)):
            if val % tp:
                raise ConfigError(f"{name}={val} is not divisible by tp={tp}; choose a tp that divides it")
        if self.batch_of_one and (self.kv_lora_rank or self.num_experts):
            raise ConfigError("batch_of_one builds dense attention and MLPs only; leave out kv_lora_rank / num_experts")
        if self.num_key_value_heads % tp and tp % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads={self.num_key_value_heads} and tp={tp}: one must divide the other")


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

        tp = get_tensor_model_parallel_world_size()
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_attention_heads // tp
        self.num_kv_heads = max(1, spec.num_key_value_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_attention_heads,
                                          spec.num_key_value_heads, bias=spec.qkv_bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(spec.num_attention_heads * spec.head_dim, spec.hidden_size,
                                        bias=spec.o_proj_bias, reduce_results=not spec.parallel_residual,
                                        prefix=f"{prefix}.o_proj")
        self.qk_norm = spec.qk_norm
        self.splitting_attention = spec.splitting_attention
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, eps=spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, eps=spec.rms_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        t = q.shape[-2] if q.dim() == 3 else q.shape[0]  # [1, T, q] with batch_of_one
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        out = attend(q, k, v, self.splitting_attention).reshape(*hidden.shape[:-1], self.q_size)
        out, _ = self.o_proj(out)
        return out


class MLAAttention(nn.Module):
    """DeepSeek MLA's shape: latent down-projection replicated on every rank, heads sharded."""

    def __init__(self, spec: DecoderSpec, prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                       RowParallelLinear)

        tp = get_tensor_model_parallel_world_size()
        self.nh = spec.num_attention_heads // tp
        self.splitting_attention = spec.splitting_attention
        self.nope, self.rope, self.vd = spec.head_dim, spec.qk_rope_head_dim, spec.head_dim
        self.q_lora, self.kv_lora = spec.q_lora_rank, spec.kv_lora_rank
        self.fused_qkv_a_proj = MergedColumnParallelLinear(
            spec.hidden_size, [self.q_lora, self.kv_lora + self.rope], bias=False, disable_tp=True,
            prefix=f"{prefix}.fused_qkv_a_proj")
        self.q_a_layernorm = RMSNorm(self.q_lora, eps=spec.rms_norm_eps)
        self.q_b_proj = ColumnParallelLinear(self.q_lora, spec.num_attention_heads * (self.nope + self.rope),
                                             bias=False, prefix=f"{prefix}.q_b_proj")
        self.kv_a_layernorm = RMSNorm(self.kv_lora, eps=spec.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora, spec.num_attention_heads * (self.nope + self.vd),
                                              bias=False, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = RowParallelLinear(spec.num_attention_heads * self.vd, spec.hidden_size, bias=False,
                                        reduce_results=not spec.parallel_residual, prefix=f"{prefix}.o_proj")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = hidden.shape[0]
        latent, _ = self.fused_qkv_a_proj(hidden)
        q_c, kv_lora = latent.split([self.q_lora, self.kv_lora + self.rope], dim=-1)
        q, _ = self.q_b_proj(self.q_a_layernorm(q_c))
        q = q.view(-1, self.nh, self.nope + self.rope)
        kv_c, k_pe = kv_lora.split([self.kv_lora, self.rope], dim=-1)
        k_pe = k_pe.reshape(t, 1, -1)  # token-dependent size plus an inferred dim (DeepSeek's form)
        kv, _ = self.kv_b_proj(self.kv_a_layernorm(kv_c))
        kv = kv.view(-1, self.nh, self.nope + self.vd)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.nh, -1)], dim=-1)
        out = attend(q, k, v, self.splitting_attention)
        out, _ = self.o_proj(out.reshape(t, self.nh * self.vd))
        return out


class TinyExperts(nn.Module):
    """Routed experts, dense CPU reference: this rank's shard of every expert's gate/up rows and
    down columns (as a fused MoE kernel holds them); its output is a partial sum over TP."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        inter = spec.intermediate_size // get_tensor_model_parallel_world_size()
        self.num_experts, self.inter = spec.num_experts, inter
        self.w13 = nn.Parameter(torch.empty(spec.num_experts, 2 * inter, spec.hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size, inter), requires_grad=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(1, topk_ids, topk_weights)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            gate, up = (x @ self.w13[e].t()).split([self.inter, self.inter], dim=-1)
            out = out + combine[:, e:e + 1] * ((F.silu(gate) * up) @ self.w2[e].t())
        return out


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str, intermediate: int | None = None,
                 reduce_results: bool = True):
        super().__init__()
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        inter = intermediate or spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [inter] * 2,
                                                       bias=spec.mlp_bias, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, spec.hidden_size, bias=spec.mlp_bias,
                                           reduce_results=reduce_results, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class SharedExpertBlock(nn.Module):
    """Qwen2-MoE's block shape: partial dense MLP + sigmoid(gate(x)) * partial shared expert, then
    one all-reduce (vLLM sums the shared expert into the routed output before reducing)."""

    def __init__(self, spec: DecoderSpec, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.linear import ReplicatedLinear

        self.top_k = spec.num_experts_per_tok
        if spec.num_experts:
            self.gate = ReplicatedLinear(spec.hidden_size, spec.num_experts, bias=False, prefix=f"{prefix}.gate")
            self.experts = TinyExperts(spec)
        else:
            self.mlp = MLP(spec, prefix, reduce_results=False)
        self.shared_expert = MLP(spec, f"{prefix}.shared_expert", spec.shared_expert_intermediate_size,
                                 reduce_results=False)
        self.shared_expert_gate = ReplicatedLinear(spec.hidden_size, 1, bias=False,
                                                   prefix=f"{prefix}.shared_expert_gate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from vllm.distributed import tensor_model_parallel_all_reduce

        if hasattr(self, "experts"):
            logits, _ = self.gate(x)
            weights, ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
            routed = self.experts(x, weights, ids)
        else:
            routed = self.mlp(x)
        gate, _ = self.shared_expert_gate(x)
        out = routed + torch.sigmoid(gate) * self.shared_expert(x)
        return tensor_model_parallel_all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, prefix: str):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm

        self.parallel_residual = spec.parallel_residual
        self.input_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.self_attn = (MLAAttention if spec.kv_lora_rank else Attention)(spec, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.mlp = (SharedExpertBlock(spec, f"{prefix}.mlp") if spec.shared_expert_intermediate_size
                    else MLP(spec, prefix=f"{prefix}.mlp", reduce_results=not spec.parallel_residual))

    def forward(self, hidden, residual):
        from vllm.distributed import tensor_model_parallel_all_reduce

        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        if self.parallel_residual:  # one all-reduce of attention + MLP partials
            return tensor_model_parallel_all_reduce(self.self_attn(hidden) + self.mlp(hidden)), residual
        hidden = self.self_attn(hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class TinyDecoder(nn.Module):
    """The compiled module (vLLM's `model.`): input ids [T] -> final hidden states [T, H]."""

    prefix = "model"

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.spec = spec
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   prefix=f"{self.prefix}.embed_tokens")
        if spec.learned_positions:  # nn.Embedding, as GPT-2's wpe: every rank holds the whole table
            self.embed_positions = nn.Embedding(spec.learned_positions, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, f"{self.prefix}.layers.{i}")
                                    for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.spec.batch_of_one:
            input_ids = input_ids.unsqueeze(0)
        hidden = self.embed_tokens(input_ids)
        if self.spec.learned_positions:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
            hidden = hidden + self.embed_positions(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


def _plain_linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


class SeededWeights:
    """Seeded full weights, drawn in a fixed order and loaded through vLLM's weight loaders (which
    shard them as a checkpoint load would): the tiny decoders' common initialisation."""

    def __init__(self, spec: "DecoderSpec", dtype: torch.dtype, seed: int):
        self.spec, self.dtype = spec, dtype
        self.gen = torch.Generator().manual_seed(seed)

    def rnd(self, *shape, scale=None) -> torch.Tensor:
        """N(0, scale^2) drawn in float64 (default scale 1/sqrt(fan_in)), cast to the model dtype."""
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float64)
        return (t * (scale if scale is not None else shape[-1] ** -0.5)).to(self.dtype)

    @staticmethod
    def load(param, full, *shard_id) -> None:
        param.weight_loader(param, full, *shard_id)

    def attention(self, att) -> None:
        """qkv_proj (q, k, v shards, biases if the spec has them) and o_proj."""
        spec, h, hd = self.spec, self.spec.hidden_size, self.spec.head_dim
        for name, rows in (("q", spec.num_attention_heads * hd), ("k", spec.num_key_value_heads * hd),
                           ("v", spec.num_key_value_heads * hd)):
            self.load(att.qkv_proj.weight, self.rnd(rows, h), name)
            if spec.qkv_bias:
                self.load(att.qkv_proj.bias, self.rnd(rows, scale=0.1), name)
        self.load(att.o_proj.weight, self.rnd(h, spec.num_attention_heads * hd))
        if spec.o_proj_bias:
            self.load(att.o_proj.bias, self.rnd(h, scale=0.1))

    def mlp(self, mlp, inter: int) -> None:
        """gate_up_proj (gate, up) and down_proj, biases if the spec has them."""
        h = self.spec.hidden_size
        for i in range(2):
            self.load(mlp.gate_up_proj.weight, self.rnd(inter, h), i)
            if self.spec.mlp_bias:
                self.load(mlp.gate_up_proj.bias, self.rnd(inter, scale=0.1), i)
        self.load(mlp.down_proj.weight, self.rnd(h, inter))
        if self.spec.mlp_bias:
            self.load(mlp.down_proj.bias, self.rnd(h, scale=0.1))


def build_tiny_decoder(spec: DecoderSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                       pack_weights: bool = False) -> TinyDecoder:
    """Build the model on this rank with seeded full weights sharded exactly as vLLM's loaders do.

    pack_weights=False keeps each linear an ATen matmul with a visible weight; True applies vLLM's
    CPU GEMM dispatch (oneDNN packing) as the real engine does, hiding the weight in `_C.onednn_mm`.
    """
    from vllm.distributed import get_tensor_model_parallel_world_size

    spec.check_tp(get_tensor_model_parallel_world_size())
    with torch.device("cpu"):
        model = TinyDecoder(spec).to(dtype)
    sw = SeededWeights(spec, dtype, seed)
    rnd, load, load_mlp = sw.rnd, sw.load, sw.mlp
    h, hd = spec.hidden_size, spec.head_dim

    load(model.embed_tokens.weight, rnd(spec.vocab_size, h, scale=1.0))

    for layer in model.layers:
        att = layer.self_attn
        if spec.kv_lora_rank:
            _load_mla(sw, att)
        else:
            sw.attention(att)
        if spec.shared_expert_intermediate_size:
            block = layer.mlp
            if spec.num_experts:
                load(block.gate.weight, rnd(spec.num_experts, h))
                _load_experts(sw, spec, block.experts)
            else:
                load_mlp(block.mlp, spec.intermediate_size)
            load_mlp(block.shared_expert, spec.shared_expert_intermediate_size)
            load(block.shared_expert_gate.weight, rnd(1, h))
        else:
            load_mlp(layer.mlp, spec.intermediate_size)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data.copy_(1.0 + rnd(h, scale=0.1))
        if spec.qk_norm and not spec.kv_lora_rank:
            att.q_norm.weight.data.copy_(1.0 + rnd(hd, scale=0.1))
            att.k_norm.weight.data.copy_(1.0 + rnd(hd, scale=0.1))
    model.norm.weight.data.copy_(1.0 + rnd(h, scale=0.1))
    if spec.learned_positions:  # drawn last: every other weight is as without the table
        model.embed_positions.weight.data.copy_(rnd(spec.learned_positions, h, scale=1.0))

    _finish_linears(model, pack_weights)
    return model.eval()


def _finish_linears(model: torch.nn.Module, pack_weights: bool) -> None:
    """vLLM's CPU GEMM dispatch (oneDNN packing) on every linear, or plain ATen matmuls."""
    for mod in model.modules():
        if hasattr(mod, "quant_method") and hasattr(mod, "weight") and mod.weight.ndim == 2 \
                and not hasattr(mod, "num_embeddings_padded"):
            if pack_weights:
                mod.quant_method.process_weights_after_loading(mod)
            else:
                mod.cpu_linear = _plain_linear


def _load_experts(sw: "SeededWeights", spec: DecoderSpec, experts) -> None:
    """Every expert's gate/up rows and down columns of this TP rank, drawn expert by expert."""
    from vllm.distributed import get_tensor_model_parallel_rank

    rnd, h = sw.rnd, spec.hidden_size
    i, r = experts.inter, get_tensor_model_parallel_rank()
    for e in range(spec.num_experts):
        gate, up, down = rnd(spec.intermediate_size, h), rnd(spec.intermediate_size, h), \
            rnd(h, spec.intermediate_size)
        experts.w13.data[e].copy_(torch.cat([gate[r * i:(r + 1) * i], up[r * i:(r + 1) * i]]))
        experts.w2.data[e].copy_(down[:, r * i:(r + 1) * i])


def _load_mla(sw: "SeededWeights", att) -> None:
    """An MLA attention's projections and latent norms."""
    rnd, load, h = sw.rnd, sw.load, sw.spec.hidden_size
    nh = sw.spec.num_attention_heads
    load(att.fused_qkv_a_proj.weight, rnd(att.q_lora, h), 0)
    load(att.fused_qkv_a_proj.weight, rnd(att.kv_lora + att.rope, h), 1)
    load(att.q_b_proj.weight, rnd(nh * (att.nope + att.rope), att.q_lora))
    load(att.kv_b_proj.weight, rnd(nh * (att.nope + att.vd), att.kv_lora))
    load(att.o_proj.weight, rnd(h, nh * att.vd))
    for norm, d in ((att.q_a_layernorm, att.q_lora), (att.kv_a_layernorm, att.kv_lora)):
        norm.weight.data.copy_(1.0 + rnd(d, scale=0.1))
