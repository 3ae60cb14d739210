"""No collective and no process-group creation inside a compilation: the pass rewrites with every
torch.distributed collective (and `new_group`) raising, once the groups a configuration needs were
created beforehand (`worker_groups.prepare_process_groups`, as the harness and the vLLM plugin do).
Runs in this process on torch's fake process group (8 ranks, this one rank 0) and synthetic
post-grad graphs, so decisions can only come from facts the rank has locally; the same runs check
the structure at TP=8 (FlashComm2 up to K=4): collectives per site, their groups and sizes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dispatch.python import enable_python_dispatcher

from fxpasses import worker_groups
from fxpasses.config import FxPassesConfig
from fxpasses.pipeline import run_passes
from fxpasses.testing.synthetic_graphs import ModelShape, build_graph, tp_context

TP = 8
SHAPE = ModelShape("tiny", 2, 256, 8, 8, 32, 512, 1024)
FORBIDDEN = ("all_gather_object", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
             "broadcast_object_list", "barrier", "monitored_barrier", "new_group", "new_subgroups",
             "reduce_scatter_tensor", "all_to_all_single", "gather_object", "scatter_object_list", "send", "recv")


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategies,k", [("flashcomm1", 1), ("flashcomm2", 1), ("flashcomm1+flashcomm2", 1),
                                          ("flashcomm2", 2), ("flashcomm1+flashcomm2", 4)])
def test_pass_rewrites_with_collectives_raising(fake_world, strategies, k, monkeypatch):
    cfg = FxPassesConfig(strategies=strategies, flashcomm2_oproj_tp_size=k, strict=True)
    ctx = tp_context(TP)
    worker_groups.prepare_process_groups(cfg, ctx)  # before "compiling": may create groups
    calls: list[str] = []

    def forbid(name):
        def boom(*a, **kw):
            calls.append(name)
            raise AssertionError(f"torch.distributed.{name} called during the pass")
        return boom

    for name in FORBIDDEN:
        for mod in (dist, dist.distributed_c10d):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, forbid(name))
    with enable_python_dispatcher():
        gm = build_graph(SHAPE, TP, dtype=torch.float32)
        rep = run_passes(gm.graph, cfg, ctx)
    assert not calls, calls
    assert rep.applied, rep.reason
    o_proj = [p for p in rep.sites if p.site.prefix.endswith("o_proj")]
    assert o_proj and all(str(p.status) == "rewritten" for p in o_proj)
    L = SHAPE.layers
    before, after = rep.before, rep.after
    fp = [tuple(f) for f in rep.fingerprint]
    n = TP // k
    if strategies == "flashcomm1":
        # every TP all-reduce (embedding, o_proj, down_proj) -> one reduce_scatter; one all_gather per
        # gathered value (qkv input, gate_up input, graph output)
        assert after == {"all_reduce": 0, "reduce_scatter": before["all_reduce"], "all_gather": 2 * L + 1,
                         "all_to_all": 0}
        assert {g for _, g, _ in fp} == {"tp"} and {s for _, _, s in fp} == {str(TP)}
    else:
        assert all(p.strategy == "flashcomm2" for p in o_proj)
        a2a = [f for f in fp if f[0] == "all_to_all"]
        assert a2a == [("all_to_all", "odp", str(n))] * L
        otp_rs = [f for f in fp if f == ("reduce_scatter", "otp", str(k))]
        assert len(otp_rs) == (L if k > 1 else 0)
        if strategies == "flashcomm2":  # the MLP all-reduces stay; o_proj's output gathered back over TP
            assert after["all_reduce"] == before["all_reduce"] - L
            assert fp.count(("all_gather", "tp", str(TP))) == L
