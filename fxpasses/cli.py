"""Command line: `fxpasses demo`, `fxpasses dump` and `fxpasses check` (also `python -m fxpasses`).

`demo` and `dump` trace a dense decoder built from real vLLM layers at TP=N over gloo (one process per rank),
rewrite it with the chosen strategies, write before/after graphs and the site report per rank,
then run the original and the rewritten graph on the same inputs and print each rank's max error
and the collective counts. Exit status: 0 rewritten and equal, 1 outputs (or collective sequences)
differ, 2 bad input, 3 nothing was rewritten on any rank.

`check` runs vLLM's real CPU engine on a checkpoint without and with the pass (`fxpasses.commands.check`):
the same codes, and 4 when the pass makes each rank send more bytes per step.

`report DIR` writes one self-contained HTML page of a run's dumps (`fxpasses.html_report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fxpasses.config import FxPassesConfig, parse_strategies
from fxpasses.errors import ConfigError, FxPassesError
from fxpasses.strategies.tp_family import TP_GRAPHS

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2e-2}


def _parse_tokens(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens wants integers like 7 or 1,7,300, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("--tokens values must be >= 1")
    return vals


#: config.json keys of models the dense tiny-model builder of `dump` cannot build (MoE, MLA)
_ENGINE_ONLY_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "kv_lora_rank", "q_lora_rank")


def refuse_engine_only_config(config_path: str) -> None:
    """ConfigError pointing to `fxpasses check` for an MoE or MLA config.json (dump builds dense
    decoders only); other problems with the file are left to the builder's own messages."""
    try:
        cfg = json.loads(Path(config_path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(cfg, dict):
        return
    found = [f"{k}={cfg[k]}" for k in _ENGINE_ONLY_KEYS if cfg.get(k)]
    if not found:
        return
    from fxpasses.commands.tiny_checkpoints import CONFIG_CLASSES
    what = "an MLA" if any(k.startswith(("kv_lora", "q_lora")) for k in found) else "an MoE"
    mt = cfg.get("model_type")
    arch = f"--arch {mt}" if mt in CONFIG_CLASSES else "--arch qwen3_moe|qwen2_moe|deepseek_v2"
    raise ConfigError(
        f"{config_path} is {what} model config ({', '.join(found)}); `fxpasses dump` builds dense decoders only "
        f"(Llama, Mistral, Qwen2, Qwen3). Check it in vLLM's engine instead: `fxpasses check --model "
        f"{Path(config_path).resolve().parent}` (the checkpoint directory with this config.json and its weights), "
        f"or `fxpasses check {arch}` for a tiny random checkpoint of that architecture")


def run_dump(config_path: str | None, tp: int, strategy: str, tokens: list[int], out: str,
             dtype: str = "float64", allreduce_form: str = "c10d", layers: int | None = None,
             patterns: list[str] | None = None, sizes: dict[str, int] | None = None) -> int:
    if config_path:
        refuse_engine_only_config(config_path)
    from fxpasses.testing.harness import rank_capture, rank_compare
    from fxpasses.testing.models.tiny import BUNDLED_CONFIG, DecoderSpec
    from fxpasses.testing.pool import TPPool

    spec = DecoderSpec.from_file(config_path or BUNDLED_CONFIG)
    if layers:
        spec = spec.replace(num_hidden_layers=layers)
    if not parse_strategies(strategy):
        raise ConfigError(f"--strategy {strategy!r} names no strategy; e.g. --strategy flashcomm1")
    cfg = FxPassesConfig(strategies=parse_strategies(strategy), dump_dir=str(Path(out).resolve()),
                         patterns=tuple(patterns or ("default",)), **(sizes or {}))
    # DP-attention strategies (otp / mlp_tp) rewrite TP=1 graphs on each of `tp` ranks, own tokens per rank
    dp = cfg.family() is not TP_GRAPHS
    spec.check_tp(1 if dp else tp)
    cfg.validate_for(1 if dp else tp, world=tp)
    print(f"fxpasses: {spec.model_type} hidden={spec.hidden_size} layers={spec.num_hidden_layers} "
          f"tp={tp} strategies={'+'.join(cfg.strategies)} dtype={dtype} all-reduce form={allreduce_form}")
    with TPPool(tp, allreduce_form, tp=1 if dp else None) as pool:
        summaries = pool.run(rank_capture, dataclasses.asdict(spec), cfg.to_dict(), dtype,
                             False, max(tokens))
        if dp:  # every rank feeds its own tokens (same count), compared with its own TP=1 output
            from fxpasses.testing.dp_harness import rank_compare_own_tokens
            results = pool.run(rank_compare_own_tokens, summaries[0]["key"], tokens)
        else:
            results = pool.run(rank_compare, summaries[0]["key"], tokens)
    tol = TOLERANCE[dtype]
    worst = 0.0
    for rank, (s, res) in enumerate(zip(summaries, results)):
        rep = s["report"]
        print(f"rank {rank}: applied={rep['applied']} {rep['diff'] or rep['reason']}")
        rewritten = [x["prefix"] for x in rep["sites"] if x["status"] == "rewritten"]
        print(f"rank {rank}: {len(rewritten)} sites rewritten, fingerprint {rep['fingerprint_digest']}")
        for r in res:
            worst = max(worst, r["rel"])
            print(f"rank {rank}: T={r['T']:>5} max_abs_err={r['max_abs']:.3e} rel_err={r['rel']:.3e}")
    print(f"dumps and site reports: {Path(out).resolve()}/rank*/")
    from fxpasses import html_report
    print(f"HTML report: {html_report.write_report(out)}")
    digests = {s["report"]["fingerprint_digest"] for s in summaries}
    if len(digests) != 1:
        print(f"DIFFERENT collective sequences across ranks ({sorted(digests)}): the rewritten graphs would hang")
        return 1
    ok = worst <= tol
    print(f"{'EQUAL' if ok else 'DIFFERENT'}: worst relative error {worst:.3e} (tolerance {tol:.0e} for {dtype})")
    if not ok:
        return 1
    if not any(s["report"]["applied"] for s in summaries):
        print("NOTHING REWRITTEN on any rank (see the reasons above and in the site reports): exit status 3")
        return 3
    return 0


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
    common.add_argument("--dtype", choices=sorted(TOLERANCE), default="float64")
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
        return run_dump(getattr(args, "config", None), args.tp, args.strategy, args.tokens, args.out,
                        args.dtype, args.allreduce_form, args.layers, args.patterns,
                        {k: v for k in ("flashcomm2_oproj_tp_size", "otp_size", "mlp_tp_size")
                         if (v := getattr(args, k)) is not None})
    except FxPassesError as e:
        print(f"fxpasses: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
