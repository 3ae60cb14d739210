"""Test and benchmark support for fxpasses; not part of the pass, not imported by the commands.

Owns the synthetic post-grad graph builders of real model sizes (`synthetic_graphs`), the
mutation harness (`mutants`), vLLM's VLLM_COMPILE path on CPU (`piecewise`), the vllm-ascend
compile path and the NPU / CUDA stand-ins (`ascend_*`, `npu_standin`, `lowering_standin`) and the
test models (`models`). The rank pool, capture and equivalence harness the tests share with
`fxpasses demo` / `dump` are product code (`fxpasses.commands.tp_run`). Used by `tests/` and
`tools/`.

The core (the pipeline, strategies and vLLM pass) never imports this subpackage;
tests/test_core_imports.py checks that.
"""
