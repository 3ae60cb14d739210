"""Command line: `fxpasses demo`, `fxpasses dump` and `fxpasses check` (also `python -m fxpasses`).

The argument parser and the dispatch; each command lives in `fxpasses.commands`. `demo` and `dump`
(`fxpasses.commands.demo`) trace a dense decoder built from real vLLM layers at TP=N over gloo,
rewrite it, and compare the original and the rewritten graph per rank. Exit status: 0 rewritten and
equal, 1 outputs (or collective sequences) differ, 2 bad input, 3 nothing was rewritten on any rank.

`check` runs vLLM's real CPU engine on a checkpoint without and with the pass (`fxpasses.commands.check`):
the same codes, and 4 when the pass makes each rank send more bytes per step.

`report DIR` writes one self-contained HTML page of a run's dumps (`fxpasses.html_report`).
"""
from __future__ import annotations

import argparse
import sys

from fxpasses.commands import DEMO_TOLERANCE
from fxpasses.errors import FxPassesError

def _parse_tokens(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens wants integers like 7 or 1,7,300, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("--tokens values must be >= 1")
    return vals


def _add_check_parser(sub) -> None:
    from fxpasses.commands.check import BYTES_AT, ENGINE_TIMEOUT_S, MAX_TOKENS, PROMPT_LENS, TOLERANCE
    from fxpasses.commands.tiny_checkpoints import QUANTS, known_archs

    c = sub.add_parser("check", help="vLLM's CPU engine without and with the pass on a checkpoint: same "
                                     "tokens? sites, bytes per step, compile times",
                       description="Runs vLLM's CPU engine (one subprocess per run) without and with the pass "
                                   "and compares greedy tokens and logprobs. Exit status: 0 equal and rewritten, "
                                   "1 outputs differ or the pass run failed, 2 bad input or the baseline cannot "
                                   "run, 3 nothing rewritten, 4 the pass sends more bytes per step.")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--arch", help="make a tiny random checkpoint of this architecture (nothing downloaded): "
                                    + ", ".join(known_archs()))
    c.add_argument("--quant", choices=list(QUANTS), default="none",
                   help="with --arch: make the tiny checkpoint W8A8 (compressed-tensors int8, served by vLLM "
                        "CPU's own int8 kernels): per-token (w8a8_dynamic) or static per-tensor (w8a8) "
                        "activation scales")
    c.add_argument("--tp", type=int, default=2)
    c.add_argument("--strategy", default="flashcomm1",
                   help="flashcomm1 (alias sp), flashcomm2, combinations joined with '+'")
    c.add_argument("--tokens", type=_parse_tokens, default=list(PROMPT_LENS),
                   help="prompt lengths, generated as one batch (prompts of 1 and 5 tokens are also generated "
                        f"alone), default {','.join(map(str, PROMPT_LENS))}")
    c.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens generated per prompt (greedy)")
    c.add_argument("--dtype", choices=["auto"] + sorted(TOLERANCE), default="auto",
                   help="auto (default): float32 where vLLM's CPU kernels on this CPU accept it, else bfloat16 "
                        "(MLA or W8A8 checkpoints on AMX CPUs)")
    c.add_argument("--tolerance", type=float, default=None,
                   help="max |logprob difference| allowed (default " +
                        ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ")")
    c.add_argument("--bytes-at", type=_parse_tokens, default=list(BYTES_AT),
                   help="token counts at which bytes per step are reported (the largest decides exit 4)")
    c.add_argument("--out", default="fxpasses-check", help="work folder: tiny checkpoint, logs, dumps, caches")
    c.add_argument("--patterns", action="append", help="pattern set name or file (repeatable)")
    c.add_argument("--flashcomm2-oproj-tp-size", type=int, default=None, help="config key flashcomm2_oproj_tp_size")
    c.add_argument("--min-tokens", type=_min_tokens, default=0,
                   help="config key min_tokens of the pass run: 0 (default) forces the rewrite at every token "
                        "count, so the check compares it; auto: the decision a default deployment takes")
    c.add_argument("--lowering", choices=["auto", "off", "reference"], default=None,
                   help="config key lowering of the pass run: fused matmul + collective kernels after the "
                        "rewrite (auto: the platform's, none on CPU; reference: the CPU reference kernels)")
    c.add_argument("--bench", type=int, default=0, metavar="N",
                   help="also measure throughput: a prefill-heavy and a decode-heavy workload in both engines, N "
                        "rounds of alternating engines (best of N), tokens/s and the ratio with/without the pass")
    c.add_argument("--hidden", type=int, default=None, help="with --arch: the tiny checkpoint's hidden size "
                                                            "(multiple of 64; heads of 64, intermediate 2.75x)")
    c.add_argument("--layers", type=int, default=None, help="with --arch: the tiny checkpoint's decoder layers")
    c.add_argument("--cpu-plain-weights", action="store_true",
                   help="both engines keep plain linear weights (vLLM's CPU fallback without oneDNN), so the graph "
                        "looks like the CUDA/NPU one and FlashComm2 can gather the o_proj weight")
    c.add_argument("--baseline-cache", default=None, metavar="DIR",
                   help="keep the baseline engine's run in DIR and reuse it in later checks of the same checkpoint "
                        "content and engine settings (not with --bench, whose engines alternate)")
    c.add_argument("--timeout", type=float, default=ENGINE_TIMEOUT_S, help="seconds per engine run")
    c.add_argument("--json", default=None, help="also write the result as JSON to this file")
    c.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines (what runs, round i of n, seconds elapsed); the report only")


def _min_tokens(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a token count >= 0 or auto")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fxpasses", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tp", type=int, default=2)
    common.add_argument("--strategy", default="flashcomm1",
                        help="flashcomm1 (alias sp), flashcomm2, otp, mlp_tp; combinations joined with '+' "
                             "(otp/mlp_tp: --tp is the number of DP-attention ranks, each at TP=1)")
    common.add_argument("--tokens", type=_parse_tokens, default=[1, 2, 7, 64, 257],
                        help="token counts to compare, e.g. 1,7,300")
    common.add_argument("--out", default="fxpasses-out")
    common.add_argument("--dtype", choices=sorted(DEMO_TOLERANCE), default="float64")
    common.add_argument("--allreduce-form", choices=["c10d", "vllm"], default="c10d",
                        help="TP all-reduce form traced: torch functional (CPU) or vllm.all_reduce (as on "
                             "CUDA/NPU)")
    common.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    common.add_argument("--patterns", action="append", help="pattern set name or file (repeatable)")
    for flag in ("flashcomm2-oproj-tp-size", "otp-size", "mlp-tp-size"):
        common.add_argument(f"--{flag}", type=int, default=None, help=f"config key {flag.replace('-', '_')}")
    sub.add_parser("demo", parents=[common], help="the main job on the bundled tiny Llama config")
    d = sub.add_parser("dump", parents=[common], help="the main job on your own HF config.json")
    d.add_argument("--config", required=True, help="HF-style config.json of a dense decoder")
    _add_check_parser(sub)
    from fxpasses import html_report
    html_report.add_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd != "report" and args.tp < 2:
        ap.error("--tp must be >= 2: the strategies rewrite tensor-parallel communication")
    try:
        if args.cmd == "report":
            return html_report.main(args)
        if args.cmd == "check":
            from fxpasses.commands import check
            return check.main(args)
        from fxpasses.commands import demo
        return demo.run_dump(args)
    except FxPassesError as e:
        print(f"fxpasses: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
