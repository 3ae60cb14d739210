"""Which kernels vLLM's CPU backend picks on this CPU, and the dtype an engine must run in for them.

vLLM's CPU backend chooses kernels from the CPU's capabilities when it loads a model (see
`fxpasses.op_forms.vllm_cpu` for the linear forms). Some of them take no float32 at all:

  AMX (amx_tile)   MLA attention: the AMX_MLA backend, bfloat16 only (`platforms/cpu.py` prefers it
                   whenever the CPU has AMX); W8A8 linears: `_C.int8_scaled_mm_with_quant`, bfloat16 /
                   float16 activations only ("expect A to be bfloat16 or half")

so on such a CPU a DeepSeek-style or W8A8 checkpoint cannot start in float32, and every other model
can. `needs_half_precision` answers for one checkpoint from facts every process has (its config.json
and this CPU); `fxpasses.commands.check_platform` turns that into the dtype `fxpasses check --dtype auto` and
the engine tests run: float32 wherever vLLM's kernels accept it (the tightest comparison), bfloat16
where they do not.
`describe()` is the line the test log and `fxpasses check` print.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuCaps:
    amx: bool               # AMX tiles: vLLM's sgl/AMX kernels (weight_packed_linear, AMX MLA, int8 w/ quant)
    avx512_bf16: bool
    avx512: bool

    @property
    def family(self) -> str:
        """The kernel family vLLM's CPU backend uses here: AVX2, AVX512 or AVX512-BF16+AMX."""
        if self.amx:
            return "AVX512-BF16+AMX" if self.avx512_bf16 else "AMX"
        if self.avx512:
            return "AVX512-BF16" if self.avx512_bf16 else "AVX512"
        return "AVX2"


def capabilities() -> CpuCaps:
    """This CPU, as torch (and through it vLLM's CPU backend) sees it."""
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", ...
    return CpuCaps(amx=bool(torch.cpu._is_amx_tile_supported()),
                   avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                   avx512=cap.startswith("AVX512"))


def needs_half_precision(config: dict, caps: CpuCaps | None = None) -> str | None:
    """Why a checkpoint with this config.json cannot run in float32 on this CPU, or None."""
    caps = caps or capabilities()
    if not caps.amx:
        return None
    if config.get("kv_lora_rank"):
        return "MLA attention runs on vLLM's AMX_MLA backend here, which takes bfloat16 only"
    quant = config.get("quantization_config") or {}
    if quant:
        return (f"{quant.get('quant_method', 'quantised')} linears run on vLLM's "
                "_C.int8_scaled_mm_with_quant here, which takes bfloat16/float16 activations only")
    return None


def describe(caps: CpuCaps | None = None) -> str:
    caps = caps or capabilities()
    return (f"CPU kernel family {caps.family} (torch capability {torch.backends.cpu.get_cpu_capability()}, "
            f"amx_tile={caps.amx}, avx512_bf16={caps.avx512_bf16})")
