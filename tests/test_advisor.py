"""The advisor: clear rejection of bad inputs, and cost-model sanity on known settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fxpasses import advisor as adv
from fxpasses.comm_volume import analytic_layer_bytes
from fxpasses.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = adv.Link(100.0, 10.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp=1), "tp must be >= 2"),
    (dict(tokens=0), "tokens=0 must be a positive"),
    (dict(link=adv.Link(0.0, 1.0)), "bandwidth"),
    (dict(link=adv.Link(10.0, -1.0)), "latency"),
    (dict(ks=[3]), "K=3"),
    (dict(ks=[16]), "K=16"),
    (dict(tp=6), "heads cannot be split"),
    (dict(dp=0), "dp=0"),
])
def test_bad_inputs_are_rejected_clearly(kwargs, match):
    m = adv.load_model("deepseek-v3")
    args = dict(tp=16, tokens=8192, link=LINK, ks=[1], dp=1)
    args.update(kwargs)
    with pytest.raises(adv.AdvisorError, match=match):
        adv.estimate(m, args["tp"], args["tokens"], args["link"], args["ks"], args["dp"])


def test_bad_model_specs(tmp_path):
    with pytest.raises(adv.AdvisorError, match="neither a preset"):
        adv.load_model("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(adv.AdvisorError, match="not valid JSON"):
        adv.load_model(str(bad))
    bad.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(adv.AdvisorError, match="lacks"):
        adv.load_model(str(bad))
    bad.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0,
                               "intermediate_size": 128}))
    with pytest.raises(adv.AdvisorError, match="must be positive"):
        adv.load_model(str(bad))


def test_hf_config_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                             "num_key_value_heads": 8, "intermediate_size": 14336, "torch_dtype": "bfloat16"}))
    m = adv.load_model(str(p))
    assert (m.hidden, m.attn_out, m.dtype_bytes) == (4096, 4096, 2)
    names = [e.strategy for e in adv.estimate(m, 8, 4096, LINK, [1, 2])]
    assert set(names) == {"vanilla", "flashcomm1", "flashcomm2(K=1)", "flashcomm2(K=2)",
                          "flashcomm1+flashcomm2(K=1)", "flashcomm1+flashcomm2(K=2)"}


def test_bytes_agree_with_the_graph_checked_analytic_model():
    m = adv.load_model("deepseek-v3")
    ests = {e.strategy: e for e in adv.estimate(m, 16, 8192, LINK, [1])}
    kw = dict(T=8192, tp=16, hidden=m.hidden, attn_out=m.attn_out, dtype_bytes=2)
    assert ests["vanilla"].bytes_per_layer == analytic_layer_bytes("vanilla", **kw)["total"]
    assert ests["flashcomm1"].bytes_per_layer == analytic_layer_bytes("flashcomm1", **kw)["total"]
    assert ests["flashcomm1+flashcomm2(K=1)"].bytes_per_layer == \
        analytic_layer_bytes("flashcomm1+flashcomm2", **kw)["total"]
    # prefill on DeepSeek TP16: FlashComm2 moves fewer bytes than FlashComm1 and stores more weight
    assert ests["flashcomm1+flashcomm2(K=1)"].bytes_per_layer < ests["flashcomm1"].bytes_per_layer
    assert ests["flashcomm1+flashcomm2(K=1)"].weight_bytes_per_layer > ests["flashcomm1"].weight_bytes_per_layer


def test_cli_errors_exit_2_with_message():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "advisor.py"), "--model", "deepseek-v3",
                        "--tp", "16", "--tokens", "-5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tokens=-5 must be a positive" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "advisor.py"), "--model", "deepseek-v3",
                        "--tp", "16", "--tokens", "8192"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "MODEL ESTIMATE" in r.stdout and "recommendation" in r.stdout


@pytest.mark.parametrize("quant", ["w8a8", "w8a8_dynamic"])
def test_int8_on_the_wire(quant):
    """W8A8: each FlashComm variant listed with int8 communication and with int8_comm off; the int8
    one sends the column gathers and the o_proj all_to_all at 1 byte per element (+ 4 bytes per
    token for dynamic scales, in the same collective: same launches), the rest unchanged."""
    m = adv.load_model("llama3-70b")
    tp, T = 8, 4096
    ests = {e.strategy: e for e in adv.estimate(m, tp, T, LINK, [1], quant=quant)}
    plain = {e.strategy: e for e in adv.estimate(m, tp, T, LINK, [1])}
    extra = 4 if quant == "w8a8_dynamic" else 0
    H, w = m.hidden, m.attn_out // tp
    ring = lambda full: (tp - 1) * full // tp  # noqa: E731
    for name in ("flashcomm1", "flashcomm2(K=1)", "flashcomm1+flashcomm2(K=1)"):
        on, off = ests[name + " int8"], ests[name + " (int8_comm off)"]
        assert off.bytes_per_layer == plain[name].bytes_per_layer
        assert len(on.collectives) == len(off.collectives)   # no extra launch
        assert on.comm_us_per_layer < off.comm_us_per_layer
        assert "int8 on the wire" in on.why and "pays at every token count" in on.why
    fc1 = ests["flashcomm1 int8"]
    assert [c for c in fc1.collectives if c[0] == "all_gather"] == [("all_gather", tp, ring(T * (H + extra)))] * 2
    fc2 = ests["flashcomm2(K=1) int8"]
    assert [c for c in fc2.collectives if c[0] == "all_to_all"] == [("all_to_all", tp, ring(T * (w + extra)))]
    assert adv.int8_row_bytes(H, quant) * 2 in (2 * H, 2 * H + 8) and adv.int8_row_bytes(H, "none") == 2 * H
    # DP attention: MLP-TP's gate_up_proj all_gather of [B, H] in int8, its reduce_scatter unchanged
    dp = 4
    B = T // dp
    dps = {e.strategy: e for e in adv.estimate(m, tp, T, LINK, [1], dp=dp, quant=quant)}
    on, off = dps[f"mlp_tp(K={dp}) int8"], dps[f"mlp_tp(K={dp}) (int8_comm off)"]
    ring_dp = lambda full: (dp - 1) * full // dp  # noqa: E731
    assert on.collectives[0] == ("all_gather", dp, ring_dp(dp * B * (H + extra)))
    assert off.collectives[0] == ("all_gather", dp, ring_dp(dp * B * H * m.dtype_bytes))
    assert on.collectives[1:] == off.collectives[1:] and on.comm_us_per_layer < off.comm_us_per_layer
    # OTP's all_to_all of [B, D] in K blocks: each block with its token's scale (dynamic)
    on, off = dps[f"otp(K={dp}) int8"], dps[f"otp(K={dp}) (int8_comm off)"]
    w = m.attn_out // dp
    assert on.collectives[0] == ("all_to_all", dp, ring_dp(dp * B * (w + extra)))
    assert off.collectives[0] == ("all_to_all", dp, ring_dp(B * m.attn_out * m.dtype_bytes))
    assert on.collectives[1:] == off.collectives[1:] and on.comm_us_per_layer < off.comm_us_per_layer
    with pytest.raises(adv.AdvisorError, match="quant='w4a8'"):
        adv.estimate(m, tp, T, LINK, [1], quant="w4a8")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "advisor.py"), "--model", "llama3-70b",
                        "--tp", "8", "--tokens", "4096", "--quant", quant], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "int8_comm off" in r.stdout and "int8 on the wire" in r.stdout


def test_kind_links_rank_with_the_gates_constants(tmp_path):
    """With per-kind constants (`--platform`, `--link-costs`: what `min_tokens: auto` decides with),
    each collective costs its own kind's fixed cost + bytes / bandwidth, once per collective: the
    times follow from the constants by hand, and cheap reduce-scatters and all-gathers put
    FlashComm1 ahead of vanilla where the CPU's constants put it behind."""
    from fxpasses import link_costs
    m = adv.load_model("llama3-70b")
    tp, T, H, b = 2, 256, m.hidden, m.dtype_bytes
    cpu = adv.KindLinks(link_costs.resolve({"calibrate": False}, "cpu"))
    ests = {e.strategy: e for e in adv.estimate(m, tp, T, cpu, [1])}
    ar, rs, ag = (link_costs.PLATFORMS["cpu"].links[k] for k in ("all_reduce", "reduce_scatter", "all_gather"))
    full = T * H * b
    assert ests["vanilla"].comm_us_per_layer == pytest.approx(2 * (ar.latency_us + full / (ar.gbps * 1e3)))
    half = full // 2
    assert ests["flashcomm1"].comm_us_per_layer == pytest.approx(
        2 * (rs.latency_us + half / (rs.gbps * 1e3)) + 2 * (ag.latency_us + half / (ag.gbps * 1e3)))
    assert adv.estimate(m, tp, T, cpu, [1])[0].strategy == "vanilla"
    cheap = {"platform": "cpu", "all_reduce": {"latency_us": 900, "gbps": 0.1},
             "reduce_scatter": {"latency_us": 1, "gbps": 100}, "all_gather": {"latency_us": 1, "gbps": 100}}
    rank = [e.strategy for e in adv.estimate(m, tp, T, adv.KindLinks(link_costs.from_report(cheap)), [1])]
    assert rank.index("flashcomm1") < rank.index("vanilla"), rank
    # a site report's token-gate costs round-trip, and the CLI reads them from a file
    measured = link_costs.LinkCosts("cpu", {k: link_costs.Link(100.0 + i, 1.5) for i, k in enumerate(link_costs.KINDS)},
                                    memory_gbps=7.0, source="calibrated on the live TP group")
    back = link_costs.from_report(measured.to_dict())
    assert back.links == measured.links and back.source == measured.source
    with pytest.raises(ConfigError, match="'links' is a list"):
        link_costs.from_report({**measured.to_dict(), "links": [1, 2]})
    f = tmp_path / "costs.json"
    f.write_text(json.dumps(measured.to_dict()))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "advisor.py"), "--model", "llama3-70b",
                        "--tp", "2", "--tokens", "256", "--link-costs", str(f)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "calibrated on the live TP group" in r.stdout and "all_to_all 103 us" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "advisor.py"), "--model", "llama3-70b",
                        "--tp", "2", "--tokens", "256", "--link-costs", '{"all_reduce": {"gbps": -1}}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "link_costs.all_reduce.gbps must be a positive number" in r.stderr
