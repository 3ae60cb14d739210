"""Process groups beyond TP exist before anything is compiled, with names every process derives
alike. In each rank of a TP=4 world, the plugin's worker-start hook (what vLLM's wrapped
`initialize_model_parallel` calls) creates FlashComm2's K=2 ODP/OTP groups from the vLLM config; the
names are derived from the rank lists alone, so a graph compiled by an earlier process resolves them;
and compiling afterwards creates nothing (the strategies only look groups up). The same hook
measures the TP group's link costs (`min_tokens: auto`), identically on every rank."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")


def rank_prepare_at_worker_start(state):
    from torch.distributed.distributed_c10d import _resolve_process_group
    from vllm.config import VllmConfig

    from fxpasses import plugin, topology
    from fxpasses.config import FxPassesConfig
    from fxpasses.context import TPContext

    from fxpasses import link_costs

    vc = VllmConfig(additional_config={"fxpasses": {"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": 2}})
    try:
        done = plugin.prepare_groups_at_worker_start(vc, env={})
        # min_tokens auto (the default): the TP group's link costs were measured here too, before compiling
        calibrated = link_costs.calibrated() and link_costs.calibrated().to_dict()
    finally:
        link_costs.set_calibrated(None)  # the pool outlives this test: later tests use fixed constants
    ctx = TPContext.from_vllm()
    g = topology.flashcomm2_groups(ctx, 2)  # lookup only: raises if the hook had not created them
    for ref in (g.odp, g.otp):
        _resolve_process_group(ref.c10d_name)  # registered with torch
    # a configuration whose groups were never prepared is refused inside a compile, with the fix
    try:
        topology.group_name((0, 3), "probe")  # no layout of this test makes {0, 3}
        missing = None
    except Exception as e:
        missing = str(e)
    return {"configs": [c.strategies for c in done], "odp": (list(g.odp.ranks), g.odp.c10d_name),
            "otp": (list(g.otp.ranks), g.otp.c10d_name),
            "missing": missing, "k1": FxPassesConfig(strategies=("flashcomm2",)).strategies,
            "calibrated": calibrated}


def test_flashcomm2_groups_are_created_at_worker_start_with_stable_names(pools):
    results = pools.get(4, "vllm").run(rank_prepare_at_worker_start)
    names = {}
    for rank, r in enumerate(results):
        assert r["configs"] == [["flashcomm2"]] or r["configs"] == [("flashcomm2",)]
        for kind in ("odp", "otp"):
            ranks, name = r[kind]
            assert rank in ranks
            assert name == "fxpasses_" + "_".join(map(str, ranks)), (rank, kind, name)  # from the ranks only
            names.setdefault(tuple(ranks), set()).add(name)
        assert "prepare_process_groups" in r["missing"], r["missing"]
    assert sorted(names) == [(0, 1), (0, 2), (1, 3), (2, 3)]
    # calibrated on every rank at worker start, to the same (max over ranks, rounded) constants
    assert results[0]["calibrated"] and all(r["calibrated"] == results[0]["calibrated"] for r in results)
    assert all(len(v) == 1 for v in names.values())  # every member names its group alike
