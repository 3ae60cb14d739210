"""`fxpasses check --bench`'s arithmetic and input checks (no engine: the engine path runs in
tests/test_vllm_engine_auto.py): each side's best time over the rounds counts, tokens/s counts prompt
tokens for prefill and generated tokens for decode, a failed engine leaves its side unmeasured, and
bad sizes are refused before any engine starts."""
import pytest

from fxpasses import cpu_kernels
from fxpasses.commands import check, engine_bench
from fxpasses.commands.check_platform import CheckPlatform
from fxpasses.errors import ConfigError
from fxpasses.commands.tiny_checkpoints import config_kwargs, scaled_shape


def _times(pb, pp, db, dp):
    return {"baseline": {"prefill": {"s": pb}, "decode": {"s": db}}, "pass": {"prefill": {"s": pp}, "decode": {"s": dp}}}


def test_best_of_the_rounds_per_side_and_the_ratio_of_tokens_per_second():
    s = engine_bench.summarise([_times(0.50, 0.40, 2.0, 2.5), _times(0.45, 0.60, 2.2, 2.0)])
    pre, dec = s["prefill"], s["decode"]
    # prefill: 16 prompts x 200 tokens over the best 0.45 s (baseline) and 0.40 s (pass)
    assert pre["baseline"]["tok_s"] == pytest.approx(3200 / 0.45, abs=0.1)
    assert pre["pass"]["tok_s"] == pytest.approx(3200 / 0.40, abs=0.1)
    assert pre["ratio"] == pytest.approx(0.45 / 0.40, abs=1e-3)
    # decode: 16 x 64 generated tokens; one engine step per generated token of the batch
    assert dec["baseline"]["tok_s"] == pytest.approx(1024 / 2.0, abs=0.1) and dec["pass"]["best_s"] == 2.0
    assert dec["baseline"]["ms_per_step"] == pytest.approx(2000 / 64, abs=0.01)
    assert dec["ratio"] == pytest.approx(1.0, abs=1e-3)
    assert pre["rounds"] == 2 and pre["baseline"]["times_s"] == [0.5, 0.45]


def test_a_failed_engine_leaves_its_side_unmeasured():
    rounds = [_times(0.5, 0.4, 2.0, 2.0), {"baseline": _times(0.3, 0, 1.0, 0)["baseline"], "pass": None}]
    s = engine_bench.summarise(rounds)
    assert s["prefill"]["baseline"]["best_s"] == 0.3 and s["prefill"]["pass"]["times_s"] == [0.4]
    assert engine_bench.summarise([{"baseline": None, "pass": None}])["decode"]["ratio"] is None
    assert "not measured" in engine_bench.format_rows(engine_bench.summarise([{"baseline": None, "pass": None}]))[0]


def test_scaled_shapes_keep_llama_proportions_and_what_each_family_takes():
    s = scaled_shape(1024, 4)
    assert s == {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
                 "intermediate_size": 2816, "num_hidden_layers": 4}
    assert scaled_shape(192)["intermediate_size"] == 576 and scaled_shape(192)["num_key_value_heads"] == 2
    assert "head_dim" not in config_kwargs("gpt_neox", **s)  # GPT-NeoX's config takes no head_dim
    assert scaled_shape() == {}
    for bad in (100, 64):
        with pytest.raises(ValueError, match="multiple of 64, at least 128"):
            scaled_shape(bad)


def test_bad_bench_and_size_arguments_are_refused_before_any_engine(tmp_path):
    with pytest.raises(ConfigError, match="--bench -1"):
        check.run_check(None, 2, arch="llama", workdir=tmp_path, bench=-1, progress=lambda line: None)
    with pytest.raises(ConfigError, match="size a tiny --arch checkpoint"):
        check.run_check(str(tmp_path), 2, workdir=tmp_path / "o", shape={"hidden_size": 256},
                        progress=lambda line: None)
    assert not (tmp_path / "baseline").exists()


def test_a_model_too_large_for_the_machine_is_refused_before_any_engine(tmp_path):
    import json

    model = tmp_path / "huge"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                   "vocab_size": 256}))
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(300 << 30)  # a sparse 300 GiB file: its size, not its blocks
    with pytest.raises(ConfigError, match=r"needs about \d+\.\d GiB .* this machine has .* GiB available"):
        check.run_check(str(model), 2, workdir=tmp_path / "o", dtype="float32", progress=lambda line: None,
                        platform=CheckPlatform("cpu", cpu=cpu_kernels.capabilities()))
    assert not (tmp_path / "o" / "baseline").exists()
    hf = {"torch_dtype": "bfloat16"}
    # 300 GiB of bf16 weights become 600 GiB in float32; in bf16 they fit a 400 GiB machine
    CheckPlatform("cpu").check_fits(model, hf, "bfloat16", 2, 64, available_bytes=400 << 30)
    with pytest.raises(ConfigError, match="600.0 GiB of float32 weights"):
        CheckPlatform("cpu").check_fits(model, hf, "float32", 2, 64, available_bytes=400 << 30)
