"""Test-only vLLM plugin: lets vLLM's CPU engine compile in VLLM_COMPILE mode (pieces split at the
attention op, a PiecewiseBackend per piece and compile range, Inductor), as CUDA does, so the pass
can be tested per piece inside the real engine.

Inert unless `FXPASSES_TESTING_VLLM_COMPILE=1` is set in the engine's environment. Then, in every
vLLM process (front end, engine core, each worker: vLLM loads general plugins in all of them):
the CPU platform's config hook, which turns VLLM_COMPILE into DYNAMO_TRACE_ONCE, leaves a requested
VLLM_COMPILE in place, and vLLM's `FixFunctionalizationPass` (written for CUDA's `_C` ops) is a
no-op (DEPLOYMENT.md section 2). Registered as the `fxpasses_testing_vllm_compile` entry point by
the test-support distribution `tests/vllm_test_plugin` (development environment only, not the wheel).
"""
from __future__ import annotations

import os

ENV = "FXPASSES_TESTING_VLLM_COMPILE"
_done = False


def register() -> None:
    global _done
    if _done or os.environ.get(ENV) != "1":
        return
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        requested = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        if requested == CompilationMode.VLLM_COMPILE:
            vllm_config.compilation_config.mode = CompilationMode.VLLM_COMPILE

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    FixFunctionalizationPass.__call__ = lambda self, graph: None
    _done = True
