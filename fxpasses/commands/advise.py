"""The strategy advisor command (`tools/advisor.py`): rank TP communication strategies by estimated comm time and weight memory.

    .venv/bin/python tools/advisor.py --model deepseek-v3 --tp 16 --tokens 8192          # seed headline
    .venv/bin/python tools/advisor.py --model path/to/config.json --tp 8 --tokens 2048 --k 1,2,4 \
        --bandwidth 50 --latency 15
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --dp 4
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --quant w8a8_dynamic
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 8 --tokens 4096 --fused npu --tflops 300
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 2 --tokens 256 --platform cpu
    .venv/bin/python tools/advisor.py --model llama3-70b --tp 2 --tokens 256 --link-costs report.json

--platform / --link-costs rank with the constants `min_tokens: auto` decides with (each collective
kind its own cost; fxpasses/link_costs.py): a platform's fixed ones, or a `link_costs` mapping in
the config's form or as a site report's token gate carries it (calibrated on the live group), given
as JSON text or a file holding it.

All numbers are MODEL ESTIMATES (see fxpasses/advisor.py), not measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fxpasses import link_costs
from fxpasses.advisor import (PRESETS, QUANTS, AdvisorError, FusedKernels, KindLinks, Link, estimate,
                              fused_estimates, fused_report, load_model, report)
from fxpasses.errors import ConfigError


def _kind_links(platform: str | None, spec: str | None) -> KindLinks:
    """--platform / --link-costs: the gate's per-kind constants (JSON text, or a file holding it)."""
    if spec is None:
        return KindLinks(link_costs.resolve({"calibrate": False}, platform))
    text = open(spec).read() if os.path.isfile(spec) else spec
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdvisorError(f"--link-costs {spec!r} is neither a file nor JSON ({e}); give e.g. "
                           '\'{"platform": "cpu", "all_gather": {"latency_us": 400, "gbps": 0.5}}\'') from None
    if isinstance(d, dict) and platform and "platform" not in d:
        d["platform"] = platform
    try:
        return KindLinks(link_costs.from_report(d))
    except ConfigError as e:
        raise AdvisorError(f"--link-costs: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help=f"preset ({', '.join(PRESETS)}) or an HF config.json path")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True, help="tokens per step on one TP group")
    ap.add_argument("--k", default="1", help="FlashComm2 o_proj TP sizes K to consider, comma separated")
    ap.add_argument("--dp", type=int, default=1, help="DP-attention size for OTP / MLP-TP (1 = not considered)")
    ap.add_argument("--bandwidth", type=float, default=100.0, help="GB/s per rank per direction")
    ap.add_argument("--latency", type=float, default=10.0, help="us per collective step")
    ap.add_argument("--platform", choices=sorted(link_costs.PLATFORMS), default=None,
                    help="rank with this platform's per-kind link constants (those min_tokens: auto uses) "
                         "instead of --bandwidth / --latency")
    ap.add_argument("--link-costs", default=None, metavar="JSON|FILE",
                    help="rank with these per-kind link constants: a link_costs mapping, or a site report's "
                         "token-gate link_costs (calibrated in the engine)")
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
        link = (_kind_links(args.platform, args.link_costs) if args.platform or args.link_costs
                else Link(args.bandwidth, args.latency))
        ests = estimate(m, args.tp, args.tokens, link, ks, args.dp, args.quant)
        fused = (fused_estimates(m, args.tp, args.tokens, link, ests,
                                 FusedKernels(args.fused, args.tflops, args.fused_overhead))
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
