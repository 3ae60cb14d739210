"""Link costs calibrated at worker start (`fxpasses.link_calibration`): two ranks of a real gloo TP
group (vLLM's groups, its shared-memory all-reduce) time the four collectives, agree on the slowest
rank's line and round it, and `link_costs.resolve` starts from it unless the config says
`calibrate: false`; the vLLM pass's cache key carries the constants that decide under `auto`.
Nothing asserts which collective is faster: only that every rank holds the same, rounded, usable
numbers, and where they are used."""
import pytest

from fxpasses import link_calibration as lc
from fxpasses import link_costs
from fxpasses.errors import ConfigError
from fxpasses.link_costs import KINDS, Link, LinkCosts


def test_two_points_give_back_the_latency_and_bandwidth_they_were_made_from():
    line = Link(latency_us=250.0, gbps=0.5)
    pts = [(b, line.time_us(b)) for b in (8_192.0, 524_288.0)]
    got = lc.fit(pts)
    assert got.latency_us == pytest.approx(250.0) and got.gbps == pytest.approx(0.5)
    assert lc.fit([(1.0, 30.0), (100.0, 20.0)]) == Link(30.0, 1e6)  # no measurable bandwidth cost


def test_rounding_keeps_two_significant_digits():
    assert [lc.round_sig(x) for x in (123.4, 0.04567, 9.96, 0.0)] == [120.0, 0.046, 10.0, 0.0]


def test_send_bytes_use_the_byte_counts_of_comm_volume():
    assert lc.send_bytes("all_reduce", 1024, 4) == 2 * 3 / 4 * 4096
    assert lc.send_bytes("reduce_scatter", 1024, 4) == 3 * 4096  # (n-1)/n of the [n x 1024] tensor


def rank_calibrate(state):
    from vllm.distributed.parallel_state import get_tp_group

    costs = lc.calibrate(get_tp_group(), "cpu", repeats=3)
    used, fixed = link_costs.resolve({}), link_costs.resolve({"calibrate": False})
    over = link_costs.resolve({"all_gather": {"latency_us": 1.0}})
    link_costs.set_calibrated(None)
    return {"costs": costs.to_dict(), "used": used.to_dict(), "fixed": fixed.to_dict(), "over": over.to_dict()}


def test_every_rank_holds_the_same_rounded_constants_and_resolve_starts_from_them(pools):
    res = pools.get(2, "shm").run(rank_calibrate)
    assert res[0]["costs"] == res[1]["costs"], res
    costs = res[0]["costs"]
    assert set(costs["links"]) == set(KINDS) and "calibrated at worker start" in costs["source"]
    for link in costs["links"].values():
        assert link["gbps"] > 0 and link["latency_us"] >= 0
        for v in (link["gbps"], link["latency_us"]):
            assert v == 0 or lc.round_sig(v) == v, link  # two significant digits: cache keys agree
    assert res[0]["used"] == costs
    assert res[0]["fixed"] == link_costs.PLATFORMS["cpu"].to_dict()
    assert res[0]["over"]["links"]["all_gather"]["latency_us"] == 1.0
    assert res[0]["over"]["links"]["reduce_scatter"] == costs["links"]["reduce_scatter"]
    assert res[0]["over"]["source"].startswith("calibrated")


def test_calibrate_must_be_a_boolean():
    with pytest.raises(ConfigError, match="link_costs.calibrate must be true or false"):
        link_costs.validate({"calibrate": "yes"})


def test_the_pass_cache_key_carries_the_deciding_constants_under_auto_only():
    from fxpasses.vllm_pass import FxPassesInductorPass

    slow = LinkCosts("cpu", {k: Link(900.0, 0.3) for k in KINDS}, 10.0, source="calibrated (test)")
    fast = LinkCosts("cpu", {k: Link(9.0, 30.0) for k in KINDS}, 10.0, source="calibrated (test)")
    try:
        keys = {}
        for name, c in (("slow", slow), ("fast", fast)):
            link_costs.set_calibrated(c)
            keys[name] = (FxPassesInductorPass(strategies=["flashcomm1"]).uuid(),
                          FxPassesInductorPass(strategies=["flashcomm1"], min_tokens=64).uuid())
    finally:
        link_costs.set_calibrated(None)
    assert keys["slow"][0] != keys["fast"][0]   # auto: the constants decide
    assert keys["slow"][1] == keys["fast"][1]   # an explicit min_tokens: they do not
