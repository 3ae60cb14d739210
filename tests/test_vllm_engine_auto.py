"""`min_tokens: auto`, the default, in the real vLLM CPU engine at TP=2 (tiny random Llama): the
CPU build compiles one graph for every token count, so the pass judges it over
[1, max_num_batched_tokens], decode included. With this platform's link costs (vLLM's
shared-memory all-reduce against gloo reduce-scatters and all-gathers, measured on the live group at
worker start) FlashComm1 is modelled slower there, so the engine runs the graph vLLM traced, and the site report says why, with the
modelled times. (Measured with the rewrite forced, `min_tokens: 0`: prefill 0.70x and decode 0.52x
the engine without the pass.) The same two engines also run `fxpasses check --bench`'s workloads
(one round): the report states each side's tokens/s and their ratio for prefill and decode."""
from __future__ import annotations

import json

import pytest

from fxpasses.commands import check

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

TP = 2


def test_auto_leaves_the_cpu_engine_alone_and_says_why(tmp_path, engine_log):
    res = engine_log(check.run_check(None, TP, "flashcomm1", arch="llama", workdir=tmp_path,
                                     config={"min_tokens": "auto"}, progress=lambda line: None, bench=1))
    assert res.exit_code == check.EXIT_NOTHING_REWRITTEN, res.message
    assert res.tokens_equal or res.outputs_equal, res.message
    assert res.collectives_after == res.collectives_before and res.collectives_before.get("all_reduce"), \
        (res.collectives_before, res.collectives_after)
    reports = [json.loads(f.read_text()) for f in sorted((tmp_path / "pass" / "dump" / "rank0")
                                                        .glob("*.site_report.json"))]
    judged = [r for r in reports if r.get("token_gate")]
    assert judged and not any(r["applied"] for r in reports), [r["reason"] for r in reports]
    for r in judged:
        gate = r["token_gate"]
        assert gate["keeps"] is False and gate["token_range"][0] == 1 and gate["link_costs"]["platform"] == "cpu"
        # measured on the live TP group at worker start (fxpasses.link_calibration), not the fixed row
        assert gate["link_costs"]["source"].startswith("calibrated at worker start"), gate["link_costs"]
        assert gate["points"][0]["tokens"] == 1 and gate["points"][0]["delta_us"] > 0
        assert "min_tokens=auto" in r["reason"] and "vLLM runs this graph for tokens [1, " in r["reason"]
        owned = [s for s in r["sites"] if s["strategy"]]
        assert owned and not any(s["status"] == "rewritten" for s in owned), owned
        skipped = [s for s in owned if s["status"] == "skipped"]
        assert skipped and all("min_tokens=auto" in s["reason"] for s in skipped), skipped
        # a time refusal is the whole graph's: no per-layer back-off (that answers bytes only)
        assert not r.get("backed_off") and not any("backed off" in s["reason"] for s in r["sites"]), r["sites"]
    # the bench ran in both engines: every workload timed REPEATS times per side, ratio = pass / baseline
    from fxpasses.commands import engine_bench

    assert set(res.bench) == set(engine_bench.WORKLOADS), res.bench
    for kind, row in res.bench.items():
        w = engine_bench.WORKLOADS[kind]
        b, p = row["baseline"], row["pass"]
        assert b and p and row["rounds"] == 1, row
        for side in (b, p):  # tokens/s of the reported best time (rounded to 0.1 token/s)
            assert abs(side["tok_s"] - w.tokens(kind) / side["best_s"]) <= 0.05 + 1e-9, (kind, side)
        assert row["ratio"] == round(p["tok_s"] / b["tok_s"], 3), row
