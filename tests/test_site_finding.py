"""Prefix recovery and graph-form recognition on real post-grad graphs."""
import pytest

from fxpasses.graph_forms import module_path

from helpers import bundled_spec, capture


@pytest.mark.parametrize("raw,expected", [
    ("L['self'].layers[0].self_attn.o_proj", "layers.0.self_attn.o_proj"),
    ("L['self']._modules['layers']._modules['11'].mlp.down_proj", "layers.11.mlp.down_proj"),
    ("L['self'].model.layers.3.mlp", "model.layers.3.mlp"),
    ("L['self'].embed_tokens", "embed_tokens"),
    ("L['self']", ""),
])
def test_module_path_normalisation(raw, expected):
    assert module_path(raw) == expected


@pytest.mark.parametrize("form,pack", [("c10d", False), ("vllm", False), ("c10d", True)])
def test_sites_match_vllm_prefixes(pools, form, pack):
    spec = bundled_spec(num_hidden_layers=2, qkv_bias=True)
    # oneDNN packs float32 weights (float64 ones stay plain matmuls)
    s = capture(pools.get(2, form), spec, pack=pack, dtype="float32" if pack else "float64")[0]
    sites = {x["prefix"]: x for x in s["report"]["sites"]}
    expected = {"model.embed_tokens": ("VocabParallelEmbedding", "embedding")}
    for i in range(2):
        expected |= {f"model.layers.{i}.self_attn.qkv_proj": ("QKVParallelLinear", "column"),
                     f"model.layers.{i}.self_attn.o_proj": ("RowParallelLinear", "row"),
                     f"model.layers.{i}.mlp.gate_up_proj": ("MergedColumnParallelLinear", "column"),
                     f"model.layers.{i}.mlp.down_proj": ("RowParallelLinear", "row")}
    assert {p: (x["class"], x["kind"]) for p, x in sites.items()} == expected
    want_form = "vllm" if form == "vllm" else "c10d"
    for p, x in sites.items():
        assert x["matmul"] is not None, p
        if x["kind"] != "column":
            assert x["all_reduce"] == want_form, (p, x)
        if pack and x["kind"] != "embedding" and "qkv_proj" not in p:  # biased qkv stays an addmm
            assert "auto_functionalized" in x["matmul"], x
