"""Latency and bandwidth of the collectives on vLLM's CPU TP group (gloo, TP=2 on this machine), the
measurement behind the `cpu` row of `fxpasses/link_costs.py`.

Two ranks (fxpasses.commands.tp_run.pool.TPPool, vLLM's shared-memory identity) time, per message size,
the model's all-reduce through vLLM's TP group and the gloo all-reduce, all-gather and
reduce-scatter the rewrite inserts (median of 15 after 3 warm-ups). Latency is read at 1 row,
bandwidth as send bytes per second at the largest size (ring accounting, as fxpasses.comm_volume).

    .venv/bin/python tools/bench_cpu_links.py            # rows 1,16,256,2048 of 1024 float32
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH = 1024


def rank_bench(state: dict, rows_list: list[int], reps: int) -> dict:
    import torch
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_tp_group

    g = get_tp_group()
    dg, n = g.device_group, g.world_size
    res = {}
    for rows in rows_list:
        x = torch.randn(rows, WIDTH)
        out, full, part = torch.empty(rows * n, WIDTH), torch.randn(rows * n, WIDTH), torch.empty(rows, WIDTH)
        ops = {"all_reduce (vLLM TP group)": lambda: g.all_reduce(x.clone()),
               "all_reduce (gloo)": lambda: dist.all_reduce(x.clone(), group=dg),
               "all_gather (gloo)": lambda: dist.all_gather_into_tensor(out, x, group=dg),
               "reduce_scatter (gloo)": lambda: dist.reduce_scatter_tensor(part, full, group=dg)}
        for name, fn in ops.items():
            for _ in range(3):
                fn()
            dist.barrier(group=g.cpu_group)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            res.setdefault(name, {})[rows] = sorted(ts)[len(ts) // 2] * 1e6
    return res


def send_bytes(name: str, rows: int, n: int) -> float:
    """Ring send bytes per rank (all_reduce 2(n-1)/n B; the others (n-1)/n B of the full tensor)."""
    full = rows * n * WIDTH * 4 if name.startswith(("all_gather", "reduce_scatter")) else rows * WIDTH * 4
    return full * (2 * (n - 1) / n if name.startswith("all_reduce") else (n - 1) / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,16,256,2048")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    from fxpasses.commands.tp_run.pool import TPPool

    pool = TPPool(2, "shm")
    try:
        res = pool.run(rank_bench, rows, args.reps)[0]
    finally:
        pool.close()
    print(f"{'collective':28s} " + " ".join(f"{r:>9d}r" for r in rows) + "   latency_us   send GB/s")
    for name, by_rows in res.items():
        top = rows[-1]
        gbps = send_bytes(name, top, 2) / (by_rows[top] * 1e3)
        print(f"{name:28s} " + " ".join(f"{by_rows[r]:9.0f}us" for r in rows)
              + f"   {by_rows[rows[0]]:10.0f}   {gbps:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
