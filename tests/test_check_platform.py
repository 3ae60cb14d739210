"""`fxpasses check` per platform (fxpasses.commands.check_platform): the dtype chosen for every architecture x
quantisation the check lists, on every CPU kernel family vLLM's CPU backend distinguishes and on an
accelerator; CPU-only settings only on CPU; refusals before any engine, naming the flag that works.

The platforms here are `CheckPlatform` values (CPU capabilities given, as `fxpasses.cpu_kernels`
would read them on each kind of CPU): what these tests check is the choice, which is a pure function
of (platform, config.json, request). The CPU engine runs end to end in the engine tier.
"""
from __future__ import annotations

import json

import pytest

from fxpasses import cpu_kernels
from fxpasses.commands import check
from fxpasses.commands import tiny_checkpoints as tc
from fxpasses.commands.check_platform import CheckPlatform
from fxpasses.errors import ConfigError

CPUS = {
    "AVX2": cpu_kernels.CpuCaps(amx=False, avx512_bf16=False, avx512=False),
    "AVX512": cpu_kernels.CpuCaps(amx=False, avx512_bf16=False, avx512=True),
    "AVX512-BF16": cpu_kernels.CpuCaps(amx=False, avx512_bf16=True, avx512=True),
    "AVX512-BF16+AMX": cpu_kernels.CpuCaps(amx=True, avx512_bf16=True, avx512=True),
}
#: vLLM CPU's kernels that take no float32 on an AMX CPU (see cpu_kernels): AMX_MLA attention (the
#: MLA architectures) and _C.int8_scaled_mm_with_quant (every W8A8 checkpoint)
MLA_ARCHS = {"deepseek_v2"}
LISTED = [(a, q) for a in tc.known_archs() for q in tc.QUANTS]


def _config(arch: str, quant: str) -> dict:
    cfg = {"model_type": arch, **tc.config_kwargs(arch)}
    if quant != "none":
        cfg["quantization_config"] = tc.quantization_config(quant)
    return cfg


def test_the_mla_architectures_are_the_ones_with_a_latent_kv():
    assert MLA_ARCHS <= set(tc.known_archs())
    assert {a for a in tc.known_archs() if tc.config_kwargs(a).get("kv_lora_rank")} == MLA_ARCHS


@pytest.mark.parametrize("family", list(CPUS))
@pytest.mark.parametrize("arch,quant", LISTED, ids=[f"{a}-{q}" for a, q in LISTED])
def test_every_listed_arch_and_quant_runs_in_a_dtype_the_cpu_kernels_take_or_is_refused(tmp_path, family, arch,
                                                                                         quant):
    if quant != "none" and arch not in tc.QUANT_ARCHS:  # refused before anything is made
        with pytest.raises(ConfigError, match=r"--quant .* with --arch one of llama, mistral"):
            check.resolve_model(None, arch, tmp_path, lambda line: None, quant)
        assert not any(tmp_path.iterdir())
        return
    plat = CheckPlatform("cpu", cpu=CPUS[family])
    assert plat.family == family
    bf16_only = CPUS[family].amx and (arch in MLA_ARCHS or quant != "none")
    dtype, why = plat.choose_dtype(_config(arch, quant), "auto")
    assert dtype == ("bfloat16" if bf16_only else "float32"), why
    if bf16_only:
        assert ("AMX_MLA" if quant == "none" else "int8_scaled_mm_with_quant") in why
        with pytest.raises(ConfigError, match=r"--dtype float32: .* use --dtype auto or --dtype bfloat16"):
            plat.choose_dtype(_config(arch, quant), "float32")
    else:
        assert plat.choose_dtype(_config(arch, quant), "float32")[0] == "float32"
    assert plat.choose_dtype(_config(arch, quant), "bfloat16")[0] == "bfloat16"


@pytest.mark.parametrize("name", ["cuda", "npu"])
def test_an_accelerator_runs_the_checkpoints_half_dtype_and_sets_nothing_cpu_specific(name):
    plat = CheckPlatform(name, devices=8, device_memory_bytes=64 << 30)
    assert plat.choose_dtype({"torch_dtype": "float16"}, "auto")[0] == "float16"
    assert plat.choose_dtype({"torch_dtype": "bfloat16"}, "auto")[0] == "bfloat16"
    dtype, why = plat.choose_dtype({"torch_dtype": "float32"}, "auto")
    assert dtype == "bfloat16" and "--dtype float32" in why
    assert plat.choose_dtype({"torch_dtype": "float32"}, "float32")[0] == "float32"
    # a W8A8 checkpoint: the CPU's AMX rule is not this platform's
    assert plat.choose_dtype(_config("llama", "w8a8"), "float32")[0] == "float32"
    assert plat.engine_env(4, {}) == {}
    assert plat.engine_env(2, {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}) == {}
    plat.check_options(8, plain_weights=False)
    with pytest.raises(ConfigError, match=r"--cpu-plain-weights changes vLLM's CPU engine only.*drop the flag"):
        plat.check_options(2, plain_weights=True)
    with pytest.raises(ConfigError, match=r"--tp 16: .* shows 8 device\(s\).* use --tp 8 or less"):
        plat.check_options(16, plain_weights=False)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_the_cpu_binds_one_thread_list_per_rank(tp):
    plat = CheckPlatform("cpu", cpu=CPUS["AVX2"])
    bind = plat.engine_env(tp, {})["VLLM_CPU_OMP_THREADS_BIND"]
    assert len(bind.split("|")) == tp and all(bind.split("|"))
    given = "|".join(str(r) for r in range(tp))
    assert plat.engine_env(tp, {"VLLM_CPU_OMP_THREADS_BIND": given}) == {"VLLM_CPU_OMP_THREADS_BIND": given}
    other = "|".join(str(r) for r in range(tp + 1))  # names another number of ranks: replaced
    assert len(plat.engine_env(tp, {"VLLM_CPU_OMP_THREADS_BIND": other})["VLLM_CPU_OMP_THREADS_BIND"]
               .split("|")) == tp
    plat.check_options(tp, plain_weights=True)  # the CPU engine's own setting


def test_an_accelerator_checks_one_ranks_share_against_one_device(tmp_path):
    model = tmp_path / "big"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(300 << 30)  # a sparse 300 GiB bfloat16 checkpoint: its size, not its blocks
    hf = {"torch_dtype": "bfloat16"}
    plat = CheckPlatform("cuda", devices=8, device_memory_bytes=80 << 30)
    with pytest.raises(ConfigError, match=r"each rank needs about 150\.\d GiB of cuda memory .* use a larger --tp"):
        plat.check_fits(model, hf, "bfloat16", 2, 64)
    plat.check_fits(model, hf, "bfloat16", 8, 64)  # 37.5 GiB + 64 MiB of 72 GiB
    # the host's memory is not what holds the weights there
    plat.check_fits(model, hf, "bfloat16", 8, 64, available_bytes=None)


def test_cpu_plain_weights_on_an_accelerator_is_refused_before_any_engine(tmp_path):
    with pytest.raises(ConfigError, match="--cpu-plain-weights"):
        check.run_check(None, 2, arch="llama", workdir=tmp_path, plain_weights=True, progress=lambda line: None,
                        platform=CheckPlatform("cuda", devices=2))
    assert not (tmp_path / "baseline").exists() and not (tmp_path / "pass").exists()
    cfg = json.loads((tmp_path / "tiny_llama" / "config.json").read_text())
    assert cfg["model_type"] == "llama"  # the refusal came after the checkpoint was read, from the platform
