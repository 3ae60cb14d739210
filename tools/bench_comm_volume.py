"""Communication volume from the rewritten graph itself, next to the analytic minimum of its layout.

Builds a post-grad-style graph of a real model shape (FakeTensors, no weights; see
fxpasses/testing/synthetic_graphs.py), rewrites it with each strategy, walks the collective nodes of the result
(`fxpasses.comm_volume`) and prints, per decoder layer, the bytes one rank sends (= receives) per
collective kind, evaluated at the requested token counts from the symbolic shapes, beside
`analytic_layer_bytes` for that layout. A mismatch is flagged (and the exit code is 1).

    .venv/bin/python tools/bench_comm_volume.py                       # Llama-3-70B shape, TP=8, 3 layers
    .venv/bin/python tools/bench_comm_volume.py --model deepseekv3dense --tokens 8192 --layers 2
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_pass_cost as B  # noqa: E402

from fxpasses import comm_volume as cv  # noqa: E402
from fxpasses.testing.synthetic_graphs import MODELS, build_graph  # noqa: E402


def fmt(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama70b", choices=["llama70b", "deepseekv3dense"])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--tokens", default="1,1000,8192")
    ap.add_argument("--strategies", default="flashcomm1,flashcomm2,flashcomm1+flashcomm2")
    args = ap.parse_args(argv)
    from torch._dispatch.python import enable_python_dispatcher
    m = MODELS[args.model].cut(args.layers)
    D = m.heads * (m.v_head_dim if m.mla else m.head_dim)
    tokens = [int(t) for t in args.tokens.split(",")]
    avail = set(B.available_strategies())
    bad = 0
    with enable_python_dispatcher():
        gm = build_graph(m, args.tp)
        syms = cv.token_symbols(gm.graph)
        print(f"{m.name}: TP={args.tp}, hidden {m.hidden}, o_proj input D={D}, bf16; MiB sent per rank per step "
              f"(= received); token symbol(s) {syms}")
        runs = [("vanilla", gm)]
        for s in args.strategies.split(","):
            if not set(s.split("+")) <= avail:
                print(f"  {s}: not implemented in this checkout, skipped")
                continue
            rep, ms, work = B.run_pass(gm, s, args.tp)
            if not rep.applied:
                print(f"  {s}: NOT APPLIED ({rep.reason})")
                continue
            runs.append((s, work))
        for s, g in runs:
            vols = cv.collective_volumes(g.graph, default_group_size=args.tp)
            sym = syms[0]
            mid = str(args.layers // 2)
            sym_expr = sum((v.send_bytes for v in vols if v.layer == mid and not v.one_time), 0)
            print(f"\n== {s}: layer {mid} per-rank send bytes = {sym_expr}")
            once = [v for v in vols if v.one_time]
            if once:
                print(f"   one-time weight transfer (not per step): {len(once)} x, "
                      f"{sum(cv.evaluate(v.send_bytes, {}) for v in once) / 2**20:.1f} MiB sent per rank in total")
            print(f"   {'T':>6} {'layer':>5} {'collectives (graph order)':<58} {'graph MiB':>9} {'analytic':>9} "
                  f"{'graph/AR':>8}")
            for T in tokens:
                pl = cv.per_layer(vols, {sym: T})
                attn_in = m.q_lora + m.kv_lora + m.rope_dim if m.mla else m.hidden  # MLA gathers latents
                ana = cv.analytic_layer_bytes(s, T=T, tp=args.tp, hidden=m.hidden, attn_out=D, dtype_bytes=2,
                                              attn_in=attn_in)
                van = cv.analytic_layer_bytes("vanilla", T=T, tp=args.tp, hidden=m.hidden, attn_out=D,
                                              dtype_bytes=2)["total"]
                for lay in [k for k in pl if k not in ("pre", "post")][:1] + [mid]:
                    d = pl.get(lay)
                    if d is None:
                        continue
                    ok = abs(d["total"] - ana["total"]) <= 1e-6 * max(1, ana["total"])
                    bad += (not ok) and lay == mid
                    print(f"   {T:>6} {lay:>5} {'+'.join(d['ops']):<58} {fmt(d['total'])} {fmt(ana['total'])} "
                          f"{d['total'] / van:>8.3f}" + ("" if ok else "  <-- graph != analytic"))
                extra = {k: pl[k]["total"] for k in ("pre", "post") if k in pl}
                if extra:
                    print(f"   {T:>6} outside layers: " + ", ".join(f"{k} {'+'.join(pl[k]['ops'])} "
                                                                  f"{pl[k]['total'] / 2**20:.2f} MiB"
                                                                  for k in extra))
    print("\nring accounting: all_reduce 2(n-1)/n B, reduce_scatter/all_gather/all_to_all (n-1)/n B "
          "(B = full tensor bytes); graph/AR = graph bytes / vanilla all-reduce bytes for the layer")
    if bad:
        print(f"{bad} layer rows differ from the analytic minimum of their layout")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
