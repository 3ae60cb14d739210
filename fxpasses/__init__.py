"""fxpasses: torch.fx passes that make vLLM tensor-parallel communication a compiler concern."""

import sys as _sys

from fxpasses import runtime_ops  # noqa: F401  (registers the ops rewritten graphs call)


def __getattr__(name):
    # `fxpasses.vllm_pass_instance` on first use (PEP 562), without importing vLLM for other users
    if name == "vllm_pass_instance":
        from fxpasses.vllm_pass import vllm_pass_instance
        return vllm_pass_instance
    raise AttributeError(f"module 'fxpasses' has no attribute {name!r}")


# vLLM resolves the string route "fxpasses.vllm_pass_instance" as
# `__import__("fxpasses").__dict__["vllm_pass_instance"]` (module __getattr__ is not consulted), so in
# a process that already has vLLM loaded the instance is created at import.
if "vllm" in _sys.modules:
    from fxpasses.vllm_pass import vllm_pass_instance  # noqa: E402,F401
