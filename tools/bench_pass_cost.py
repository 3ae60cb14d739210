"""Pass cost at model scale, without allocating a single weight.

Times `run_passes` per strategy (find_sites / plan / rewrite / verify / total, from the pipeline's
own timings) on post-grad-style ATen graphs of real model sizes (`fxpasses.testing.synthetic_graphs`:
the real post-grad node forms and `nn_module_stack`, FakeTensor values with a symbolic token count,
no weights allocated), next to one FakeTensorProp of the same graph measured in the same run.

    .venv/bin/python tools/bench_pass_cost.py                 # Llama-3-70B 80L + 8L, DeepSeek-V3 dense
    .venv/bin/python tools/bench_pass_cost.py --models llama70b-8 --repeat 1
    .venv/bin/python tools/bench_pass_cost.py --profile llama70b   # cProfile of the pass, top 25
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.fx as fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxpasses.testing.synthetic_graphs import MODELS, build_graph, tp_context  # noqa: E402


def available_strategies() -> list[str]:
    from fxpasses.strategies.registry import registered_names
    return list(registered_names())


def fake_prop_ms(gm: fx.GraphModule) -> float:
    from fxpasses.verify import fake_propagate
    t = time.perf_counter()
    fake_propagate(gm)
    return (time.perf_counter() - t) * 1e3


def run_pass(gm: fx.GraphModule, strategy: str, tp: int):
    """Rewrite a private copy of `gm` (the pipeline mutates in place); return (report, wall ms, gm)."""
    from fxpasses.config import FxPassesConfig
    from fxpasses.graph_copy import copy_graph
    from fxpasses.pipeline import run_passes
    work = fx.GraphModule(gm, copy_graph(gm.graph))
    cfg = FxPassesConfig.from_dict({"strategies": strategy})
    t = time.perf_counter()
    # as the vLLM pass calls it: Inductor regenerates the module's code after its post-grad passes;
    # one graph for every size up to 8192 tokens (min_tokens auto judges it: fxpasses.token_gate)
    rep = run_passes(work.graph, cfg, tp_context(tp), recompile=False, token_range=(1, 8192))
    return rep, (time.perf_counter() - t) * 1e3, work


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama70b-8,llama70b,deepseekv3dense-8,deepseekv3dense")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--strategies", default="", help="comma list; default: every implemented strategy")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (median reported)")
    ap.add_argument("--profile", default="", help="cProfile the pass on this model and print the top 25")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # Inductor runs post-grad passes with the Python dispatcher on (symbolic pad sizes need it)
    from torch._dispatch.python import enable_python_dispatcher
    with enable_python_dispatcher():
        return _main(args)


def _main(args) -> int:
    strategies = [s for s in args.strategies.split(",") if s] or available_strategies()
    if args.profile:
        import cProfile
        import pstats
        gm = build_graph(MODELS[args.profile], args.tp)
        pr = cProfile.Profile()
        pr.enable()
        rep, ms, _ = run_pass(gm, strategies[0], args.tp)
        pr.disable()
        print(f"{args.profile}: {ms:.0f} ms, timings {rep.extra.get('timings_ms')}")
        pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        return 0
    rows = []
    print(f"TP={args.tp}; times in ms, median of {args.repeat}; 'prop' = one FakeTensorProp of the original "
          "graph in the same run")
    hdr = (f"{'model':<18} {'strategy':<11} {'layers':>6} {'nodes':>6} {'sites':>5} {'rewr':>4} {'find':>7} "
           f"{'plan':>6} {'rewrite':>8} {'verify':>8} {'total':>8} {'ms/L':>6} {'prop':>7} {'pass/prop':>9}")
    print(hdr)
    print(f"{'':<18} (build = graph construction time, not part of the pass)")
    for name in [s for s in args.models.split(",") if s]:
        m = MODELS[name]
        t = time.perf_counter()
        gm = build_graph(m, args.tp)
        build_ms = (time.perf_counter() - t) * 1e3
        nodes = len(gm.graph.nodes)
        for strat in strategies:
            props, totals, tims, rep = [], [], [], None
            for _ in range(args.repeat):
                props.append(fake_prop_ms(gm))
                rep, ms, _ = run_pass(gm, strat, args.tp)
                totals.append(rep.extra["timings_ms"].get("total", ms))
                tims.append(rep.extra["timings_ms"])
            med = lambda k: statistics.median(t.get(k, 0.0) for t in tims)  # noqa: E731
            total, prop = statistics.median(totals), statistics.median(props)
            row = dict(model=name, strategy=strat, layers=m.layers, nodes=nodes, sites=len(rep.sites),
                       rewritten=len(rep.rewritten()), find=med("find_sites"), plan=med("plan"),
                       rewrite=med("rewrite"), verify=med("verify"), total=total, prop=prop,
                       applied=rep.applied, reason=rep.reason, build=build_ms)
            rows.append(row)
            print(f"{name:<18} {strat:<11} {m.layers:>6} {nodes:>6} {row['sites']:>5} {row['rewritten']:>4} "
                  f"{row['find']:>7.0f} {row['plan']:>6.1f} {row['rewrite']:>8.0f} {row['verify']:>8.0f} "
                  f"{total:>8.0f} {total / m.layers:>6.1f} {prop:>7.0f} {total / prop:>9.2f}"
                  + f"  build {build_ms:.0f}" + ("" if rep.applied else f"  NOT APPLIED: {rep.reason}"))
    print()
    for strat in strategies:
        for base in ("llama70b", "deepseekv3dense"):
            full = next((r for r in rows if r["model"] == base and r["strategy"] == strat), None)
            cut = next((r for r in rows if r["model"] == f"{base}-8" and r["strategy"] == strat), None)
            if full and cut:
                print(f"scaling {base} {strat}: {full['layers']}L/8L total = {full['total'] / cut['total']:.2f} "
                      f"(linear = {full['layers'] / 8:.2f}); target <= {11 * full['layers'] / 80:.2f}")
    for r in rows:
        if r["model"] == "llama70b":
            ok = r["total"] < 2000
            print(f"llama70b 80L {r['strategy']}: {r['total']:.0f} ms ({'meets' if ok else 'MISSES'} the 2 s target); "
                  f"pass/prop = {r['total'] / r['prop']:.2f} ({'meets' if r['total'] <= 3 * r['prop'] else 'MISSES'} "
                  "the 3x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
