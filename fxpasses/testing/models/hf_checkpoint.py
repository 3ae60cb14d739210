"""A tiny random-weight Hugging Face decoder checkpoint (default: Llama) that vLLM's CPU engine can load.

Nothing is downloaded: the config is built locally and the weights are drawn from a seeded
generator. The default shape (hidden 128, 2 layers, 4 heads of 32, 2 KV heads, vocab 256) is the
smallest that the vLLM CPU attention backend accepts at TP=2 (head_dim >= 32). Used by the engine
test; `tools/make_tiny_llama.py` is its command line.
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

CONFIG_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    # MoE with vLLM's gated shared expert summed into the routed output before one all-reduce
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}

# per-family defaults on top of DEFAULT_SHAPE
FAMILY_SHAPE: dict[str, dict[str, Any]] = {
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": False},
}


def make_tiny_model(out_dir: str | Path, model_type: str = "llama", dtype: str = "float32", seed: int = 0,
                    **shape: Any) -> Path:
    """Write config.json + model.safetensors of a random-weight decoder into `out_dir`; return it.

    Weights are scaled so that activations stay O(1) through the layers, which makes greedy
    decoding sensitive to any numerical error a rewrite might introduce (the logits are not flat).
    """
    import torch
    import transformers

    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"model_type must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}")
    cfg_name, model_name = CONFIG_CLASSES[model_type]
    kw = {**DEFAULT_SHAPE, **FAMILY_SHAPE.get(model_type, {}), **shape}
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
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # vLLM with skip_tokenizer_init needs no tokenizer files; generation_config keeps defaults neutral
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return out
