"""Strategy advisor CLI: rank TP communication strategies by estimated comm time and weight memory.

    .venv/bin/python tools/advisor.py --model deepseek-v3 --tp 16 --tokens 8192          # seed headline
    .venv/bin/python tools/advisor.py --model path/to/config.json --tp 8 --tokens 2048 --k 1,2,4 \
        --bandwidth 50 --latency 15
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --dp 4
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --quant w8a8_dynamic
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --fused npu --tflops 300

All numbers are MODEL ESTIMATES (see fxpasses/advisor.py), not measurements.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxpasses.advisor import (PRESETS, QUANTS, AdvisorError, Link, estimate, fused_estimates,  # noqa: E402
                              fused_report, load_model, report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}) or an HF config.json path")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True, help="tokens per step on one TP group")
    ap.add_argument("--k", default="1", help="FlashComm2 o_proj TP sizes K to consider, comma separated")
    ap.add_argument("--dp", type=int, default=1, help="DP-attention size for OTP / MLP-TP (1 = not considered)")
    ap.add_argument("--bandwidth", type=float, default=100.0, help="GB/s per rank per direction")
    ap.add_argument("--latency", type=float, default=10.0, help="us per collective step")
    ap.add_argument("--dtype-bytes", type=int, default=None, help="activation bytes (default from config: 2)")
    ap.add_argument("--quant", choices=QUANTS, default="none",
                    help="the model's linear inputs are quantised to int8 (W8A8 static / dynamic): compare int8 "
                         "communication (int8_comm auto) with float communication (int8_comm off)")
    ap.add_argument("--fused", choices=("npu", "cuda"), default=None,
                    help="also estimate the lowering's fused matmul + collective kernels on this platform")
    ap.add_argument("--tflops", type=float, default=300.0, help="matmul throughput for --fused (TFLOPS)")
    ap.add_argument("--fused-overhead", type=float, default=5.0, help="us per fused kernel for --fused")
    args = ap.parse_args(argv)
    try:
        try:
            ks = [int(x) for x in args.k.split(",") if x.strip()]
        except ValueError:
            raise AdvisorError(f"--k {args.k!r}: give integers separated by commas, e.g. 1,2") from None
        if args.dtype_bytes is not None and args.dtype_bytes not in (1, 2, 4):
            raise AdvisorError(f"--dtype-bytes {args.dtype_bytes}: must be 1, 2 or 4")
        m = load_model(args.model, args.dtype_bytes)
        link = Link(args.bandwidth, args.latency)
        ests = estimate(m, args.tp, args.tokens, link, ks, args.dp, args.quant)
        fused = (fused_estimates(m, args.tp, args.tokens, link, ests, args.fused, args.tflops, args.fused_overhead)
                 if args.fused else None)
    except AdvisorError as e:
        print(f"advisor: error: {e}", file=sys.stderr)
        return 2
    print(report(m, args.tp, args.tokens, link, ests))
    if fused is not None:
        print(fused_report(m, args.tokens, fused, args.fused, args.tflops, args.fused_overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
