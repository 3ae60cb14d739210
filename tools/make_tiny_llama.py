"""Save a tiny random-weight Hugging Face decoder (default: Llama) that vLLM's CPU engine can load.

Nothing is downloaded: the config is built locally and the weights are drawn from a seeded
generator. The default shape (hidden 128, 2 layers, 4 heads of 32, 2 KV heads, vocab 256) is the
smallest that the vLLM CPU attention backend accepts at TP=2 (head_dim >= 32).

    python tools/make_tiny_llama.py OUT_DIR [--model-type llama|qwen3_moe|deepseek_v2|...] [--dtype float32]

The builder is `fxpasses.commands.tiny_checkpoints.make_tiny_model` (`fxpasses check --arch` and the engine
tests use it).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxpasses.commands.tiny_checkpoints import CONFIG_CLASSES, DEFAULT_SHAPE, make_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model-type", default="llama", choices=sorted(CONFIG_CLASSES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=DEFAULT_SHAPE["num_hidden_layers"])
    a = ap.parse_args(argv)
    p = make_tiny_model(a.out_dir, a.model_type, a.dtype, a.seed, num_hidden_layers=a.layers)
    print(p)


if __name__ == "__main__":
    main()
