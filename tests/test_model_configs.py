"""HF config.json -> the dense-decoder shape the CLI builds (Llama, Mistral, Qwen2, Qwen3)."""
import json

import pytest

from fxpasses.errors import ConfigError
from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256}


@pytest.mark.parametrize("model_type,extra,qkv_bias,o_bias,qk_norm", [
    ("llama", {}, False, False, False),
    ("llama", {"attention_bias": True}, True, True, False),
    ("mistral", {"head_dim": 32}, False, False, False),
    ("qwen2", {}, True, False, False),
    ("qwen3", {"attention_bias": False}, False, False, True),
])
def test_families_map_to_their_layer_options(tmp_path, model_type, extra, qkv_bias, o_bias, qk_norm):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**BASE, "model_type": model_type, **extra}))
    spec = DecoderSpec.from_file(p)
    assert (spec.qkv_bias, spec.o_proj_bias, spec.qk_norm) == (qkv_bias, o_bias, qk_norm)
    assert spec.head_dim == extra.get("head_dim", 16)


def test_bad_model_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"lacks \['intermediate_size'\]"):
        DecoderSpec.from_hf_config({k: v for k, v in BASE.items() if k != "intermediate_size"})
    with pytest.raises(ConfigError, match="MoE"):
        DecoderSpec.from_hf_config({**BASE, "num_experts": 8})
    with pytest.raises(ConfigError, match="does not exist"):
        DecoderSpec.from_file(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by tp=3"):
        DecoderSpec.from_hf_config(BASE).check_tp(3)
