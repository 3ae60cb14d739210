"""A graph compiled by an earlier process still works: FlashComm2 with K=2 (its own ODP/OTP groups and
the `fxpasses::odp_weight` op; OTP / MLP-TP's DP groups come from the same worker-start preparation,
`tests/test_groups_at_worker_start.py`) is compiled with Inductor and the
vLLM pass into a fresh FX graph cache by one set of rank processes; a new set of processes, started
as vLLM workers start (groups prepared, fxpasses imported), loads the compiled graph from that cache
(the pass does not run again) and computes what the model computes eagerly."""
from __future__ import annotations

import json
import shutil

import pytest

from fxpasses.commands.tp_run.pool import TPPool
from helpers import bundled_spec

pytest.importorskip("vllm")


def rank_compile_and_compare(state, spec, config, cache_dir, tokens, own_tokens):
    import os

    import torch
    from torch._dynamo.utils import counters

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from torch._inductor import config as inductor_config

    from fxpasses.config import FxPassesConfig
    from fxpasses.context import TPContext
    from fxpasses.commands.tp_run.tiny_decoder import DecoderSpec, build_tiny_decoder
    from fxpasses.worker_groups import prepare_process_groups
    from fxpasses.vllm_pass import FxPassesInductorPass

    class CountingPass(FxPassesInductorPass):
        calls = 0

        def __call__(self, graph):
            type(self).calls += 1
            return super().__call__(graph)

    ds = DecoderSpec(**spec)
    model = build_tiny_decoder(ds, dtype=torch.float32)
    prepare_process_groups(FxPassesConfig.from_dict(config), TPContext.from_vllm())  # as at worker start
    the_pass = CountingPass(**config)
    counters.clear()
    torch._dynamo.reset()
    errs = []
    with torch.no_grad(), inductor_config.patch(post_grad_custom_post_pass=the_pass, fx_graph_cache=True,
                                                fx_graph_remote_cache=False, autotune_local_cache=False):
        compiled = torch.compile(model, backend="inductor", dynamic=True, fullgraph=True)
        for T in tokens:
            seed = 1000 + T + (state["rank"] if own_tokens else 0)
            ids = torch.randint(0, ds.vocab_size, (T,), generator=torch.Generator().manual_seed(seed))
            got, ref = compiled(ids), model(ids)
            errs.append(((got - ref).abs().max() / ref.abs().max()).item())
    return {"calls": CountingPass.calls, "hit": counters["inductor"]["fxgraph_cache_hit"],
            "miss": counters["inductor"]["fxgraph_cache_miss"], "errs": errs}


CASES = {
    "flashcomm2-K2": (4, None, {"strategies": ["flashcomm2"], "flashcomm2_oproj_tp_size": 2, "min_tokens": 0}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_from_the_fx_graph_cache_runs_in_fresh_processes(case, tmp_path):
    world, tp, config, own_tokens = CASES[case]
    spec = bundled_spec(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                        hidden_size=32, intermediate_size=64, vocab_size=128)
    tokens = [3, 8, 13]  # one symbolic graph (T >= 2)
    dump = tmp_path / "dump"
    config = {**config, "dump_dir": str(dump), "strict": True}
    runs = []
    for attempt in range(2):  # a first set of processes fills the cache; a fresh set loads from it
        with TPPool(world, "c10d", tp=tp) as pool:
            runs.append(pool.run(rank_compile_and_compare, spec, config, str(tmp_path / "inductor"), tokens,
                                 own_tokens))
        if attempt == 0:
            for rank in range(world):
                rep = json.loads((dump / f"rank{rank}" / "site_report.json").read_text())
                assert rep["applied"], rep["reason"]
                done = {x["strategy"] for x in rep["sites"] if x["status"] == "rewritten"}
                assert done == set(config["strategies"]), rep["sites"]
            shutil.rmtree(dump)
    assert not dump.exists()  # the second set of processes did not run the pass
    first, second = runs
    for rank in range(world):
        assert first[rank]["calls"] >= 1 and first[rank]["miss"] >= 1, first[rank]
        assert second[rank]["hit"] >= 1 and second[rank]["calls"] == 0, second[rank]  # served by the cache
        for r in (first[rank], second[rank]):
            assert max(r["errs"]) <= 1e-5, (rank, r)
