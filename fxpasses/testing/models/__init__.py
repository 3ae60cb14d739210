"""Small dense decoder models for the demo, the CLI and the tests.

`tiny.py` assembles a model from real vLLM layers; `tiny_llama.json` is the bundled HF-style config
used by `fxpasses demo`. `hf_checkpoint.py` re-exports `fxpasses.commands.tiny_checkpoints`, which writes
a random-weight Hugging Face checkpoint that vLLM's CPU engine can load (`fxpasses check --arch`, the
engine tests, `tools/make_tiny_llama.py`).
"""
