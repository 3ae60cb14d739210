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


# ---- recognition beyond Llama's names --------------------------------------------------------------

@pytest.mark.parametrize("raw,expected", [
    # the MoE router reached through vLLM's forward context (Qwen3-MoE in the CPU engine)
    ("model.G.__import_vllm_dot_forward_context._forward_context.no_compile_layers."
     "model.layers.0.mlp.experts.gate", "model.layers.0.mlp.experts.gate"),
    # a shared expert reached through a closure cell (Qwen2-MoE in the CPU engine)
    ("model.layers.0.mlp.experts._shared_experts._mk_can_overlap_shared_experts.__closure__.0."
     "cell_contents._shared_experts._layer.gate_up_proj",
     "model.layers.0.mlp.experts._shared_experts._mk_can_overlap_shared_experts._shared_experts._layer.gate_up_proj"),
    ("model.layers.3.self_attn.o_proj", "model.layers.3.self_attn.o_proj"),
])
def test_mangled_prefixes_are_normalised(raw, expected):
    from fxpasses.graph_forms import normalise_prefix
    assert normalise_prefix(raw) == expected


def test_default_patterns_own_rows_by_class_and_name_the_override():
    from fxpasses.config import FxPassesConfig
    from fxpasses.patterns_loader import load_patterns
    from fxpasses.strategies import registry

    ps = load_patterns("default")
    fc1, fc2 = ps.for_strategy(registry.get("flashcomm1")), ps.for_strategy(registry.get("flashcomm2"))
    for name in ("attention.dense", "mlp.dense_4h_to_h", "attn.c_proj", "mlp.c_proj", "self_attn.out_proj",
                 "mlp.fc2", "mlp.w2", "block.o_proj"):
        assert fc1.matches("row", f"model.layers.0.{name}"), name
    assert fc1.matches("reduce", "model.layers.0.mlp")
    for name in ("attention.dense", "attn.c_proj", "self_attn.out_proj"):
        assert fc2.matches("row", f"model.layers.0.{name}"), name
    assert not fc2.matches("row", "model.layers.0.mlp.dense_4h_to_h")
    # a MergedColumnParallelLinear built with disable_tp=True is replicated by prefix
    assert ps.kind_of(["MergedColumnParallelLinear", "ColumnParallelLinear"],
                      "model.layers.0.self_attn.fused_qkv_a_proj") == "replicated"
    assert ps.kind_of(["MergedColumnParallelLinear", "ColumnParallelLinear"],
                      "model.layers.0.mlp.gate_up_proj") == "column"
    # subclasses are recognised by their bases (vLLM's MoE router GateLinear is a ReplicatedLinear)
    assert ps.kind_of(["GateLinear", "ReplicatedLinear", "LinearBase"], "model.layers.0.mlp.gate") == "replicated"
    assert FxPassesConfig(strategies=("flashcomm1",)).patterns == ("default",)


def test_overrides_name_a_site_kind(tmp_path):
    from fxpasses.errors import PatternError
    from fxpasses.patterns_loader import load_patterns

    bad = tmp_path / "bad.toml"
    bad.write_text('[classes]\nrow = ["RowParallelLinear"]\n[overrides]\nreplicate = ["q_a_proj"]\n')
    with pytest.raises(PatternError, match="overrides.replicate is not a site kind"):
        load_patterns(str(bad))


def test_a_batch_of_one_layout_is_sharded_along_its_token_dim():
    """vLLM's Transformers backend runs [1, T, H]: dim 0 is the batch, the token count is dim 1. The
    rewriter pads and reduce-scatters dim 1 (never the batch of one) and the verifier finds ceil(T/tp)
    rows there; the [T, H] view that feeds the row matmul keeps its tokens on dim 0."""
    import torch
    from torch._dispatch.python import enable_python_dispatcher

    from fxpasses.config import FxPassesConfig
    from fxpasses.pipeline import run_passes
    from fxpasses.report import collective_counts
    from fxpasses.testing import synthetic_graphs as sg

    aten = torch.ops.aten
    cls = sg._vllm_classes()
    with enable_python_dispatcher():
        b = sg.FakeGraphBuilder(dtype=torch.float32)
        H, V = 32, 64
        ids = b(aten.unsqueeze.default, b.ids, 0)                      # [1, T]
        w_e = b.weight(V, H)
        with b.module("embed_tokens", cls["embed"]):
            x = sg._all_reduce(b, b(aten.embedding.default, w_e, ids))  # [1, T, H]
        w = b.weight(H, H)
        with b.module("layers.0.mlp.down_proj", cls["row"]):
            flat = b(aten.view.default, x, [b.T_node, H])
            y = b(aten.view.default, sg._linear(b, flat, w), [1, b.T_node, H])
            y = sg._all_reduce(b, y)
        gm = b.output(y)
        before = collective_counts(gm.graph)
        rep = run_passes(gm.graph, FxPassesConfig(strategies=("flashcomm1",), module_prefix="model"),
                         sg.tp_context(2))
    assert rep.applied, rep.reason
    rows = [p for p in rep.sites if p.site.kind in ("row", "embedding")]
    assert len(rows) == 2 and all(p.reason == "all_reduce -> pad + reduce_scatter" for p in rows), rows
    assert rep.extra["token_layout"]["token_dim"] == 1, rep.extra["token_layout"]
    after = collective_counts(gm.graph)
    assert (after["all_reduce"], after["reduce_scatter"]) == (0, before["all_reduce"]), (before, after)
    # [1, T, H] is padded on dim 1 (pad list [H: 0, 0, T: 0, pad]), never on the batch dim
    pads = [n.args[1] for n in gm.graph.nodes if n.target is aten.constant_pad_nd.default]
    assert len(pads) == 2 and all(len(p) == 4 and p[:3] == [0, 0, 0] for p in pads), pads


def test_a_layer_reached_through_the_forward_context_keeps_its_full_prefix():
    from fxpasses.graph_forms import layer_prefix as _prefix
    raw = "G.__import_vllm_dot_forward_context._forward_context.no_compile_layers.model.layers.0.mlp.experts.gate"
    assert _prefix("model", raw) == "model.layers.0.mlp.experts.gate"
    assert _prefix("model", "layers.0.mlp.gate") == "model.layers.0.mlp.gate"


def test_synthetic_graphs_use_vllms_classes_and_fail_loudly_when_they_cannot():
    """With vLLM installed the synthetic graphs carry vLLM's own layer classes; if those cannot be
    imported they raise instead of silently building the class-name stand-in form."""
    import builtins
    from unittest import mock

    from fxpasses.testing import synthetic_graphs as sg
    from vllm.model_executor.layers.linear import RowParallelLinear

    cls = sg._vllm_classes()
    assert cls["vllm_ir"] is True and cls["row"] is RowParallelLinear
    real_import = builtins.__import__

    def broken(name, *a, **kw):
        if name.startswith("vllm.model_executor.layers.linear"):
            raise ImportError("simulated broken vLLM layer module")
        return real_import(name, *a, **kw)

    with mock.patch.object(builtins, "__import__", broken), pytest.raises(RuntimeError, match="cannot be imported"):
        sg._vllm_classes()
