"""Opt-in: vLLM's CPU engine keeps its unquantized linear weights plain, so its graphs look like the
CUDA / NPU ones.

vLLM's CPU backend packs every unquantized linear weight for oneDNN (or its small-GEMM kernel) when
it loads a model (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`), and the weight
disappears from the graph: a row layer is `auto_functionalized(_C.onednn_mm, ...)` on a handle.
FlashComm2 needs the o_proj weight in the graph (it all-gathers it over the ODP group once), as it
is on CUDA and NPU (`aten.mm` / `addmm` on the weight parameter). With `FXPASSES_CPU_PLAIN_WEIGHTS=1`
in every vLLM process (the plugin reads it at registration), the dispatch takes vLLM's own fallback
for a CPU without oneDNN: `layer.cpu_linear = torch.nn.functional.linear`, weight kept. Quantised
layers are not touched (they never go through this dispatch). It changes which kernels run, so
compare engines that both have it (`fxpasses check --cpu-plain-weights` sets it for both).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("fxpasses")

ENV = "FXPASSES_CPU_PLAIN_WEIGHTS"


def requested(env=None) -> bool:
    return (env if env is not None else os.environ).get(ENV, "0") == "1"


def install() -> bool:
    """Route vLLM's CPU GEMM dispatch to its plain fallback for 2-D weights (idempotent). True when
    installed now or before."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_fxpasses_plain", False):
        return True

    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            return original(layer, remove_weight)  # conv / MoE weights: vLLM's own handling
        import torch

        layer.cpu_linear = torch.nn.functional.linear

    dispatch_cpu_unquantized_gemm._fxpasses_plain = True  # type: ignore[attr-defined]
    dispatch_cpu_unquantized_gemm.__wrapped__ = original  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    log.info("fxpasses: %s=1: vLLM's CPU linears keep plain weights (torch.nn.functional.linear)", ENV)
    return True
