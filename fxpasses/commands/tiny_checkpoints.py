"""Tiny random-weight Hugging Face checkpoints that vLLM's CPU engine can load, one per architecture
family (`fxpasses check --arch NAME`, the engine tests, `tools/make_tiny_llama.py`).

This module owns the list of architectures `--arch` knows (`CONFIG_CLASSES`), their tiny shapes
(`DEFAULT_SHAPE` + `FAMILY_SHAPE`) and the weight initialisation. Nothing is downloaded: the config
comes from transformers' config class, the weights from a seeded generator. The shapes are the
smallest vLLM's CPU attention accepts at TP=2 (hidden 128, 2 layers, heads of 32, vocab 256; MLA:
the CPU MLA decode kernel only exists for kv_lora_rank 512 + rope 64).

`quant` makes the same checkpoint W8A8 in compressed-tensors' int8 format (`QUANTS`): every
decoder-layer linear weight int8 with a float32 scale per output channel, activations quantised
per token at run time (`w8a8_dynamic`) or with a static per-tensor scale (`w8a8`). vLLM's CPU
engine serves it with its own int8 kernels (`_C.dynamic/static_scaled_int8_quant` +
`_C.onednn_scaled_mm`, weights packed by oneDNN), which is how int8 on the wire is checked there.

Imports transformers and torch only inside `make_tiny_model`, so `fxpasses check --help` and the
argument checks stay fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

#: --arch name -> (transformers config class, transformers model class)
CONFIG_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    # MoE with vLLM's gated shared expert summed into the routed output before one all-reduce
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    # MoE without shared expert, q/k norm
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    # MLA attention (q_lora, kv_lora) + one dense layer then one MoE layer with shared experts and
    # grouped top-k routing
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    # Command-R: parallel residual (attention and MLP read the same LayerNorm output), tied embeddings
    "cohere": ("CohereConfig", "CohereForCausalLM"),
    # vLLM 0.32 has no native GPT-NeoX / OLMo2: both run through its Transformers backend (HF modules,
    # linears swapped for vLLM's parallel ones from the config's base_model_tp_plan)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}

#: architectures vLLM 0.32 serves through its Transformers backend (the rest are native vLLM models)
TRANSFORMERS_BACKEND = frozenset({"gpt_neox", "olmo2"})

# per-family settings on top of DEFAULT_SHAPE
FAMILY_SHAPE: dict[str, dict[str, Any]] = {
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": False},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    "deepseek_v2": {
        "num_key_value_heads": 4,
        "q_lora_rank": 64, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_group": 2, "topk_group": 1, "topk_method": "group_limited_greedy", "scoring_func": "softmax",
        "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    },
    "cohere": {"layer_norm_eps": 1e-5, "logit_scale": 0.25, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": True, "use_qk_norm": False,
               "num_key_value_heads": 2},
    "gpt_neox": {"layer_norm_eps": 1e-5, "use_parallel_residual": True, "hidden_act": "gelu",
                 "attention_bias": True, "bos_token_id": 0, "eos_token_id": 0},
    "olmo2": {"pad_token_id": 0, "eos_token_id": 0},
}

# keys a family's config class does not take (dropped from DEFAULT_SHAPE for it)
_DROP: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("num_key_value_heads", "head_dim", "rms_norm_eps"),
    "cohere": ("rms_norm_eps", "head_dim"),
    "deepseek_v2": ("head_dim",),
}


#: `make_tiny_model(quant=...)`: activation schemes of the W8A8 (int8 weights per channel) checkpoints
QUANTS = ("none", "w8a8", "w8a8_dynamic")
#: architectures `quant` applies to: dense decoders served by vLLM's own model classes
QUANT_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
#: the static scheme's per-tensor activation scale (activations here are O(1): |x| <= 127 * 0.03)
STATIC_INPUT_SCALE = 0.03


def scaled_shape(hidden: int | None = None, layers: int | None = None) -> dict[str, Any]:
    """Config overrides for a tiny checkpoint of hidden size `hidden` (Llama-like proportions: heads of
    64, a quarter as many kv heads, at least 2, intermediate 2.75 x hidden rounded up to 64) and
    `layers` decoder layers. {} when neither is given."""
    shape: dict[str, Any] = {}
    if hidden is not None:
        if hidden < 128 or hidden % 64:
            raise ValueError(f"--hidden {hidden}: give a multiple of 64, at least 128")
        heads = hidden // 64
        shape.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=max(2, heads // 4),
                     head_dim=64, intermediate_size=-(-hidden * 11 // 4 // 64) * 64)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers {layers}: give at least 1")
        shape["num_hidden_layers"] = layers
    return shape


def known_archs() -> list[str]:
    return sorted(CONFIG_CLASSES)


def config_kwargs(model_type: str, **shape: Any) -> dict[str, Any]:
    """The config keyword arguments `make_tiny_model` uses for `model_type` (shape overrides last)."""
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"model_type must be one of {known_archs()}, got {model_type!r}")
    drop = _DROP.get(model_type, ())
    base = {k: v for k, v in DEFAULT_SHAPE.items() if k not in drop}
    return {**base, **FAMILY_SHAPE.get(model_type, {}), **{k: v for k, v in shape.items() if k not in drop}}


def make_tiny_model(out_dir: str | Path, model_type: str = "llama", dtype: str = "float32", seed: int = 0,
                    quant: str = "none", **shape: Any) -> Path:
    """Write config.json + model.safetensors of a random-weight decoder into `out_dir`; return it.

    Weights are scaled so that activations stay O(1) through the layers, which makes greedy
    decoding sensitive to any numerical error a rewrite might introduce (the logits are not flat).
    `quant`: one of `QUANTS`; not "none" writes the decoder layers' linears as compressed-tensors
    W8A8 (see the module docstring).
    """
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if quant != "none" and model_type not in QUANT_ARCHS:
        raise ValueError(f"quant={quant!r} is made for the dense architectures {sorted(QUANT_ARCHS)} only "
                         f"(MoE experts and MLA projections are not quantised here), not {model_type!r}")
    import torch
    import transformers

    kw = config_kwargs(model_type, **shape)
    cfg_name, model_name = CONFIG_CLASSES[model_type]
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg.dtype = dtype
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # linear weights, and MoE experts' stacked [E, out, in] weights
                # std 1/sqrt(fan_in) keeps the residual stream O(1); embeddings get std 1
                std = 1.0 if "embed" in name else p.shape[-1] ** -0.5
                p.normal_(0.0, std)
            elif "norm" in name and not name.endswith(".bias"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # vLLM with skip_tokenizer_init needs no tokenizer files; generation_config keeps defaults neutral
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    if quant != "none":
        _quantize_w8a8(out, quant == "w8a8_dynamic")
    return out


def quantization_config(quant: str) -> dict[str, Any]:
    """The config.json `quantization_config` of a `quant` checkpoint (compressed-tensors int8: weights
    per output channel; activations per token when dynamic, one static per-tensor scale else)."""
    if quant not in QUANTS or quant == "none":
        raise ValueError(f"quant must be one of {QUANTS[1:]}, got {quant!r}")
    dynamic = quant == "w8a8_dynamic"
    act = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": dynamic,
           "strategy": "token" if dynamic else "tensor"}
    return {
        "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": act,
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel"}}},
        "ignore": ["lm_head"]}


def _quantize_w8a8(out: Path, dynamic: bool) -> None:
    """Rewrite `out`'s decoder-layer linear weights as compressed-tensors int8 ("int-quantized"):
    symmetric per-output-channel weight scales; activations per token (dynamic) or one static
    per-tensor scale. Embeddings, norms and lm_head stay float."""
    import torch
    from safetensors.torch import load_file, save_file

    f = out / "model.safetensors"
    tensors = load_file(f)
    new: dict[str, Any] = {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("_proj.weight") and t.dim() == 2:
            w = t.double()
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
            stem = name[: -len("weight")]
            new[name] = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
            new[stem + "weight_scale"] = scale.float()
            if not dynamic:
                new[stem + "input_scale"] = torch.tensor([STATIC_INPUT_SCALE], dtype=torch.float32)
        else:
            new[name] = t
    save_file(new, f, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quantization_config("w8a8_dynamic" if dynamic else "w8a8")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
