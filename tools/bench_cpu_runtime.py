"""CPU runtime check: rewritten vs original step time over gloo at TP=2, measured in the same run.

Two gloo ranks (fxpasses.testing.pool.TPPool) build a few-layer dense decoder from real vLLM layers,
capture its post-grad graph once (symbolic token count) with the pass, then time
`cap.originals[0]` (vanilla TP) and `cap.graphs[0]` (rewritten) on the same inputs, interleaved
(orig, new, orig, new, ...) so machine noise hits both alike; the ratio new/orig is printed.
CAVEAT: gloo over loopback TCP on a shared CPU is not a datacentre interconnect; the ratio says
whether the rewrite costs anything gross on CPU, not what it gains on NVLink/HCCS.

    .venv/bin/python tools/bench_cpu_runtime.py                       # flashcomm1, T = 256,1024,4096
    .venv/bin/python tools/bench_cpu_runtime.py --strategy flashcomm1+flashcomm2 --tokens 256,1024 --iters 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rank_time(state: dict, key: str, token_counts: list[int], iters: int, seed: int = 0) -> list[dict]:
    """In a TPPool worker: median step time of the original and the rewritten graph per token count."""
    import torch
    import torch.distributed as dist

    from fxpasses.testing.harness import graph_args

    out = []
    with torch.no_grad():
        for T in token_counts:
            cap, args = graph_args(state, key, T, seed)
            cap.originals[0](*list(args))  # warm-up both
            cap.graphs[0](*list(args))
            to, tn = [], []
            for _ in range(iters):
                for fn, acc in ((cap.originals[0], to), (cap.graphs[0], tn)):
                    dist.barrier()
                    t = time.perf_counter()
                    fn(*list(args))
                    acc.append(time.perf_counter() - t)
            out.append({"T": T, "orig_ms": statistics.median(to) * 1e3, "new_ms": statistics.median(tn) * 1e3,
                        "ratio": statistics.median(n / o for n, o in zip(tn, to))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="flashcomm1")
    ap.add_argument("--tokens", default="256,1024,4096")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    from fxpasses.testing.harness import rank_capture
    from fxpasses.testing.pool import TPPool

    spec = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8, vocab_size=1024)
    tokens = [int(t) for t in args.tokens.split(",")]
    with TPPool(2) as pool:
        summ = pool.run(rank_capture, spec, {"strategies": args.strategy}, args.dtype)
        rep = summ[0]["report"]
        print(f"TP=2 gloo, {args.layers} layers, hidden {args.hidden}, {args.dtype}, strategy {args.strategy}: "
              f"{rep.get('diff')}")
        res = pool.run(rank_time, summ[0]["key"], tokens, args.iters)
    print(f"{'T':>6} {'orig ms':>9} {'rewritten ms':>12} {'new/orig':>9}   (rank 0; median of {args.iters}, "
          "interleaved)")
    for r in res[0]:
        print(f"{r['T']:>6} {r['orig_ms']:>9.1f} {r['new_ms']:>12.1f} {r['ratio']:>9.3f}")
    print("caveat: gloo over loopback on a shared 2-core CPU is not a datacentre interconnect")
    return 0


if __name__ == "__main__":
    sys.exit(main())
