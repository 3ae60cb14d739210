"""Test, demo and benchmark support for fxpasses; not part of the pass itself.

Owns the post-grad graph capture outside vLLM (`capture`), the gloo TP pool of rank processes
with vLLM's distributed state initialised (`pool`), the equivalence harness (`harness`) and its
DP-attention variant for OTP / MLP-TP (`dp_harness`), the tiny models built from real vLLM layers
and the tiny HF checkpoint writer (`models`), and the synthetic post-grad graph builders of real
model sizes (`synthetic_graphs`). Used by the CLI (`fxpasses demo` / `fxpasses dump`), `tests/`
and `tools/`.

The core (the pipeline, strategies and vLLM pass) never imports this subpackage;
tests/test_core_imports.py checks that.
"""
