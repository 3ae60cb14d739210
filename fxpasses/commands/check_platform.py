"""Where `fxpasses check` runs its engines: the settings, dtype and limits of one vLLM platform.

`detect()` asks vLLM which platform this process would run on (`current_platform.device_type`, the
same answer the engines get) and how many devices it sees. `CheckPlatform` then owns everything the
check does differently per platform, so that `fxpasses.commands.check` itself is platform-neutral:

  cpu             environment: VLLM_CPU_OMP_THREADS_BIND (the ranks split over the cores, or taking
                  turns on them when there are fewer cores than ranks; a given bind naming `tp` ranks
                  is kept). dtype `auto`: float32 wherever vLLM's CPU kernels take it, else bfloat16
                  (`fxpasses.cpu_kernels`); an explicit dtype those kernels refuse is refused here.
                  Limit: one engine (weights, KV caches, processes) fits in the host's memory.
  cuda, npu, ...  nothing CPU-specific is set (a CPU knob already in the environment is left as the
                  user set it). dtype `auto`: the checkpoint's float16 / bfloat16, else bfloat16
                  (vLLM's GPU and Ascend attention backends do not all take float32). Limits: `tp`
                  devices visible; a rank's share of the weights plus its KV cache fits in one
                  device's memory. `--cpu-plain-weights` is refused: there the weights are already in
                  the graph.

Every refusal is a ConfigError raised before any engine starts, naming the reason and the flag that
works. The choices are pure functions of (platform, checkpoint config, request), unit-tested for
every listed architecture x quantisation in tests/test_check_platform.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fxpasses import cpu_kernels
from fxpasses.errors import ConfigError

#: resident memory of one vLLM CPU process before weights and KV cache (front end, engine core, workers)
PROCESS_OVERHEAD_BYTES = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: the share of an accelerator's memory one rank may plan for (vLLM's own default utilisation)
DEVICE_MEMORY_SHARE = 0.9


@dataclass(frozen=True)
class CheckPlatform:
    name: str                                   # vLLM's device_type: "cpu", "cuda", "npu", ...
    devices: int = 0                            # accelerators visible (0 on CPU)
    device_memory_bytes: int = 0                # one device's total memory (0: unknown / CPU)
    cpu: cpu_kernels.CpuCaps | None = None      # the CPU's kernel family (CPU platform only)

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def describe(self) -> str:
        if self.is_cpu:
            return f"vLLM platform cpu, {cpu_kernels.describe(self.cpu)}"
        mem = f", {self.device_memory_bytes / (1 << 30):.0f} GiB each" if self.device_memory_bytes else ""
        return f"vLLM platform {self.name}, {self.devices} device(s){mem}"

    @property
    def family(self) -> str:
        """What the report's `cpu` field shows: the CPU kernel family, or the accelerator platform."""
        return self.cpu.family if self.is_cpu and self.cpu else self.name

    # -- settings -------------------------------------------------------------------------------
    def engine_env(self, tp: int, environ: dict[str, str] | None = None) -> dict[str, str]:
        """Variables this platform's engines need on top of the caller's environment."""
        if not self.is_cpu:
            return {}
        bind = threads_bind(tp, environ if environ is not None else dict(os.environ))
        return {"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {}

    def check_options(self, tp: int, plain_weights: bool) -> None:
        """ConfigError for options this platform cannot honour."""
        if plain_weights and not self.is_cpu:
            raise ConfigError(f"--cpu-plain-weights changes vLLM's CPU engine only; on {self.name} the linear "
                              "weights are already in the graph (FlashComm2 sees them): drop the flag")
        if not self.is_cpu and tp > self.devices:
            raise ConfigError(f"--tp {tp}: this {self.name} machine shows {self.devices} device(s) and each "
                              f"rank needs its own; use --tp {self.devices} or less (at least 2), or run on more "
                              "devices")

    # -- dtype -----------------------------------------------------------------------------------
    def choose_dtype(self, config: dict, requested: str) -> tuple[str, str]:
        """(dtype, why) the engines run the checkpoint with `config` (its config.json) in.
        `requested`: "auto" or a dtype; a dtype this platform's kernels refuse is a ConfigError."""
        if self.is_cpu:
            why_not_f32 = cpu_kernels.needs_half_precision(config, self.cpu)
            if requested == "auto":
                if why_not_f32:
                    return "bfloat16", why_not_f32
                return "float32", "vLLM's CPU kernels for this model accept float32 on this CPU"
            if requested == "float32" and why_not_f32:
                raise ConfigError(f"--dtype float32: {why_not_f32} ({cpu_kernels.describe(self.cpu)}); use "
                                  "--dtype auto or --dtype bfloat16")
            return requested, "given by --dtype"
        if requested != "auto":
            return requested, "given by --dtype"
        stored = stored_dtype(config)
        if stored in ("float16", "bfloat16"):
            return stored, f"the checkpoint's dtype, which {self.name} kernels take"
        return "bfloat16", (f"the checkpoint is {stored}; not every vLLM {self.name} attention "
                            "backend takes float32, so the engines run bfloat16 (--dtype float32 to insist)")

    # -- limits ----------------------------------------------------------------------------------
    def check_fits(self, model: Path, config: dict, dtype: str, tp: int, kv_cache_mb: int,
                   available_bytes: int | None = None) -> None:
        """ConfigError before any engine starts when one engine would not fit: on CPU the host's
        available memory holds the weights in `dtype` (the *.safetensors at their stored dtype,
        scaled), `tp` KV caches and about PROCESS_OVERHEAD_BYTES per process (tp workers + 2); on an
        accelerator one device holds a rank's 1/tp of the weights and its KV cache. The two engines
        run one after the other, so one engine must fit."""
        gib = 1 << 30
        weights = checkpoint_bytes(model, config, dtype)
        if self.is_cpu:
            need = weights + tp * (kv_cache_mb << 20) + (tp + 2) * PROCESS_OVERHEAD_BYTES
            if available_bytes is None:
                import psutil
                available_bytes = psutil.virtual_memory().available
            if need > available_bytes:
                raise ConfigError(
                    f"one engine needs about {need / gib:.1f} GiB ({weights / gib:.1f} GiB of {dtype} weights, "
                    f"{tp} x {kv_cache_mb} MiB KV cache, {tp + 2} processes), but this machine has "
                    f"{available_bytes / gib:.1f} GiB available; check a smaller model (--hidden / --layers with "
                    "--arch), a smaller --tp, or run on a machine with more memory")
            return
        per_rank = weights / tp + (kv_cache_mb << 20)
        have = (available_bytes if available_bytes is not None else self.device_memory_bytes) * DEVICE_MEMORY_SHARE
        if have and per_rank > have:
            raise ConfigError(
                f"each rank needs about {per_rank / gib:.1f} GiB of {self.name} memory (1/{tp} of "
                f"{weights / gib:.1f} GiB of {dtype} weights + {kv_cache_mb} MiB KV cache), but one device has "
                f"{have / gib:.1f} GiB to give; use a larger --tp, a smaller model, or --dtype bfloat16")


def stored_dtype(config: dict) -> str:
    """The dtype a checkpoint's config.json says its weights are stored in (float32 when it says none)."""
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


def checkpoint_bytes(model: Path, config: dict, dtype: str) -> float:
    """The checkpoint's weights in `dtype`: its *.safetensors bytes scaled from the stored dtype."""
    stored = DTYPE_BYTES.get(stored_dtype(config), 4)
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) * DTYPE_BYTES.get(dtype, 4) / stored


def threads_bind(tp: int, environ: dict[str, str]) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` ranks: the environment's when it names `tp` ranks, else
    the cores split evenly, or shared round-robin where there are fewer cores than ranks."""
    given = environ.get("VLLM_CPU_OMP_THREADS_BIND")
    if given and len(given.split("|")) == tp:
        return given
    cpus = os.cpu_count() or tp
    n = cpus // tp
    if n < 1:  # more ranks than cores (TP=4 on 2 cores: 0|1|0|1): the ranks take turns on the cores
        return "|".join(str(r % cpus) for r in range(tp))
    return "|".join(f"{r * n}-{r * n + n - 1}" if n > 1 else str(r) for r in range(tp))


def detect() -> CheckPlatform:
    """The platform vLLM runs on in this process (imports vLLM's platform module)."""
    from vllm.platforms import current_platform as p

    name = str(getattr(p, "device_type", "") or "cpu")
    if p.is_cpu() or name == "cpu":
        return CheckPlatform("cpu", cpu=cpu_kernels.capabilities())
    import torch
    mod = getattr(torch, name, None)  # torch.cuda, torch.npu (torch_npu), torch.xpu
    devices = int(mod.device_count()) if mod is not None and hasattr(mod, "device_count") else 0
    memory = 0
    if devices and hasattr(mod, "get_device_properties"):
        memory = int(getattr(mod.get_device_properties(0), "total_memory", 0))
    return CheckPlatform(name, devices=devices, device_memory_bytes=memory)


