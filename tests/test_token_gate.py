"""`min_tokens: auto` (fxpasses.token_gate, fxpasses.link_costs): the token count from which a rewrite
is modelled to pay, the endpoint the plugin adds to vLLM's compile ranges, and the per-range
decision the pass takes from the graph it is handed."""
from types import SimpleNamespace

import pytest

from fxpasses import link_costs, token_gate
from fxpasses.errors import ConfigError
from fxpasses.link_costs import Link, LinkCosts


def _flat(latency_us: float, gbps: float, memory_gbps: float) -> LinkCosts:
    return LinkCosts("test", {k: Link(latency_us, gbps) for k in link_costs.KINDS}, memory_gbps)


@pytest.mark.parametrize("tp, expected", [(2, 26), (4, 18)])
def test_flashcomm1_crossover_matches_the_closed_form(tp, expected):
    """Every collective costs α = 10 µs and (almost) nothing per byte; the residual stream's two
    add+norms write 2 x 2 x H x b bytes per row at 1 GB/s. FlashComm1 adds two collectives per
    layer (2α) and saves the rows T - ceil(T/tp) of each: it pays once
    (T - ceil(T/tp)) x 8 H b / 1e3 >= 2α, i.e. T - ceil(T/tp) >= 12.5 for H = 100, b = 2:
    T = 26 at tp 2 (floor(T/2) >= 13), T = 18 at tp 4 (18 - 5 = 13; 17 - 5 = 12)."""
    costs = _flat(10.0, 1e9, 1.0)
    n = token_gate.analytic_min_tokens("flashcomm1", max_tokens=4096, tp=tp, hidden=100, attn_out=100,
                                       dtype_bytes=2, costs=costs)
    assert n == expected


@pytest.mark.parametrize("hidden, dtype_bytes", [(512, 4), (1024, 4), (2048, 2), (4096, 2), (8192, 2)])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("strategy", ["flashcomm1", "flashcomm1+flashcomm2"])
def test_cpu_link_costs_never_pay_for_flashcomm1(strategy, tp, hidden, dtype_bytes):
    """vLLM's CPU engine all-reduces through shared memory and the inserted reduce-scatters and
    all-gathers go over gloo: with FlashComm1 on, `auto` leaves this platform alone at every size
    (measured in the engine at TP=2: prefill 0.70x, decode 0.52x with the rewrite forced)."""
    assert token_gate.analytic_min_tokens(strategy, max_tokens=8192, tp=tp, hidden=hidden, attn_out=hidden,
                                          dtype_bytes=dtype_bytes, costs=link_costs.PLATFORMS["cpu"]) is None


@pytest.mark.parametrize("platform", ["cuda", "npu"])
def test_a_wider_model_pays_from_fewer_tokens(platform):
    """Per token the norms save memory traffic in proportion to H while the extra launches cost a
    constant: the crossover falls as the model widens, and exists on the device platforms."""
    ns = [token_gate.analytic_min_tokens("flashcomm1", max_tokens=16384, tp=4, hidden=h, attn_out=h, dtype_bytes=2,
                                         costs=link_costs.PLATFORMS[platform]) for h in (2048, 4096, 8192)]
    assert all(n is not None for n in ns) and ns[0] > ns[1] > ns[2] > 1, ns


def test_range_points_are_both_ends_and_every_padding_phase():
    assert token_gate.range_points(9, 2048, 4) == [9, 10, 11, 12, 2048]
    assert token_gate.range_points(1, 3, 4) == [1, 2, 3]
    assert token_gate.range_points(5, None, 2) == [5, 6]


def _vllm_config(platform: str, hidden: int, max_tokens: int = 8192):
    import torch
    from transformers import LlamaConfig
    from vllm.config import CompilationConfig

    hf = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=32,
                     num_key_value_heads=8, num_hidden_layers=2)
    cfg = SimpleNamespace(min_tokens="auto", strategies=("flashcomm1",), flashcomm2_oproj_tp_size=1,
                          link_costs={"platform": platform})
    vc = SimpleNamespace(compilation_config=CompilationConfig(compile_ranges_endpoints=[max_tokens]),
                         scheduler_config=SimpleNamespace(max_num_batched_tokens=max_tokens),
                         model_config=SimpleNamespace(hf_config=hf, dtype=torch.bfloat16),
                         parallel_config=SimpleNamespace(tensor_parallel_size=4, world_size=4))
    return vc, cfg


def test_plugin_adds_the_crossover_to_vllms_compile_ranges():
    """On a platform where FlashComm1 pays from N tokens, vLLM compiles [1, N-1] and [N, max]: the
    modelled layer time is no worse at N and worse at N - 1."""
    from fxpasses.plugin import add_auto_compile_range

    vc, cfg = _vllm_config("npu", 4096)
    end = add_auto_compile_range(vc, cfg)
    assert end is not None and 1 < end < 8192
    assert [(r.start, r.end) for r in vc.compilation_config.get_compile_ranges()] == [(1, end), (end + 1, 8192)]
    kw = dict(tp=4, hidden=4096, attn_out=4096, dtype_bytes=2, costs=link_costs.PLATFORMS["npu"])
    assert token_gate.layer_time_us("flashcomm1", end + 1, **kw) <= token_gate.layer_time_us("vanilla", end + 1, **kw)
    assert token_gate.layer_time_us("flashcomm1", end, **kw) > token_gate.layer_time_us("vanilla", end, **kw)


def test_plugin_adds_no_range_where_the_layout_never_pays(caplog):
    import logging

    from fxpasses.plugin import add_auto_compile_range

    vc, cfg = _vllm_config("cpu", 4096)
    with caplog.at_level(logging.INFO, logger="fxpasses"):
        assert add_auto_compile_range(vc, cfg) is None
    assert vc.compilation_config.compile_ranges_endpoints == [8192]
    assert any("modelled slower than the all-reduces at every token count" in r.getMessage() for r in caplog.records)
    cfg.min_tokens = 0   # an explicit count is honoured as it is: no range added
    vc, _ = _vllm_config("npu", 4096)
    assert add_auto_compile_range(vc, cfg) is None and vc.compilation_config.compile_ranges_endpoints == [8192]


@pytest.mark.parametrize("spec, message", [
    ({"platform": "tpu"}, "link_costs.platform must be one of"),
    ({"all_gather": {"gbps": 0}}, "link_costs.all_gather.gbps must be a positive number"),
    ({"all_reduce": {"latency": 3}}, "link_costs.all_reduce must be a mapping with latency_us"),
    ({"nvlink": 1}, "unknown link_costs key 'nvlink'"),
    ({"memory_gbps": -1}, "link_costs.memory_gbps must be a positive number"),
])
def test_bad_link_costs_name_the_entry(spec, message):
    from fxpasses.config import FxPassesConfig

    with pytest.raises(ConfigError, match=message):
        FxPassesConfig(strategies=("flashcomm1",), link_costs=spec)


def test_link_cost_overrides_apply_over_the_platform():
    c = link_costs.resolve({"platform": "cuda", "all_gather": {"latency_us": 3}, "memory_gbps": 7})
    assert c.platform == "cuda" and c.link("all_gather") == Link(3.0, link_costs.PLATFORMS["cuda"].link("all_gather").gbps)
    assert c.memory_gbps == 7.0 and c.link("all_reduce") == link_costs.PLATFORMS["cuda"].link("all_reduce")
    assert link_costs.resolve({}, platform="npu") is link_costs.PLATFORMS["npu"]


@pytest.mark.parametrize("platform, token_range, kept", [("cpu", (1, 64), False), ("cuda", (8192, 16384), True)])
def test_the_pipeline_keeps_a_rewrite_only_where_the_gate_says_it_pays(platform, token_range, kept):
    """`min_tokens: auto` through `run_passes` on a symbolic Llama-70B-shaped graph (2 layers, TP=4):
    CPU link costs over decode-sized counts refuse FlashComm1 with the gate's reason and leave every
    collective; CUDA costs at prefill sizes keep it, and the report carries the modelled points."""
    from torch._dispatch.python import enable_python_dispatcher

    from fxpasses.config import FxPassesConfig
    from fxpasses.pipeline import run_passes
    from fxpasses.testing.synthetic_graphs import LLAMA3_70B, build_graph, tp_context

    cfg = FxPassesConfig(strategies=("flashcomm1",), min_tokens="auto",
                         link_costs={"platform": platform, "calibrate": False})
    with enable_python_dispatcher():
        gm = build_graph(LLAMA3_70B.cut(2), 4)
        rep = run_passes(gm.graph, cfg, tp_context(4), token_range=token_range)
    gate = rep.extra["token_gate"]
    assert gate["keeps"] is kept and [p["tokens"] for p in gate["points"]][0] == token_range[0], gate
    assert rep.applied is kept, rep.reason
    if not kept:
        assert "min_tokens=auto" in rep.reason and rep.after == rep.before, rep.reason
