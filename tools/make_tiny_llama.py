"""Save a tiny random-weight Hugging Face decoder (default: Llama) that vLLM's CPU engine can load.

Nothing is downloaded: the config is built locally and the weights are drawn from a seeded
generator. The default shape (hidden 128, 2 layers, 4 heads of 32, 2 KV heads, vocab 256) is the
smallest that the vLLM CPU attention backend accepts at TP=2 (head_dim >= 32).

    python tools/make_tiny_llama.py OUT_DIR [--model-type llama|mistral|qwen2|qwen3] [--dtype float32]

Importable too: `from tools.make_tiny_llama import make_tiny_model` (tests use it).
"""
from __future__ import annotations

import argparse
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

_CONFIG_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_model(out_dir: str | Path, model_type: str = "llama", dtype: str = "float32", seed: int = 0,
                    **shape: Any) -> Path:
    """Write config.json + model.safetensors of a random-weight decoder into `out_dir`; return it.

    Weights are scaled so that activations stay O(1) through the layers, which makes greedy
    decoding sensitive to any numerical error a rewrite might introduce (the logits are not flat).
    """
    import torch
    import transformers

    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"model_type must be one of {sorted(_CONFIG_CLASSES)}, got {model_type!r}")
    cfg_name, model_name = _CONFIG_CLASSES[model_type]
    kw = {**DEFAULT_SHAPE, **shape}
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg.dtype = dtype
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                # std 1/sqrt(fan_in) keeps the residual stream O(1); embeddings get std 1
                std = 1.0 if "embed" in name else p.shape[1] ** -0.5
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model-type", default="llama", choices=sorted(_CONFIG_CLASSES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=DEFAULT_SHAPE["num_hidden_layers"])
    a = ap.parse_args(argv)
    p = make_tiny_model(a.out_dir, a.model_type, a.dtype, a.seed, num_hidden_layers=a.layers)
    print(p)


if __name__ == "__main__":
    main()
