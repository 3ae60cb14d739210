"""`fxpasses demo` and `fxpasses dump`: trace a dense decoder built from real vLLM layers at TP=N over
gloo (one process per rank, `fxpasses.commands.tp_run`), rewrite it with the chosen strategies, write
before/after graphs and the site report per rank, then run the original and the rewritten graph on
the same inputs and print each rank's max error and the collective counts. Exit status: 0 rewritten
and equal, 1 outputs (or collective sequences) differ, 2 bad input, 3 nothing was rewritten."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fxpasses import html_report
from fxpasses.commands import DEMO_TOLERANCE
from fxpasses.commands.tiny_checkpoints import CONFIG_CLASSES
from fxpasses.commands.tp_run.dp_harness import rank_compare_own_tokens
from fxpasses.commands.tp_run.harness import rank_capture, rank_compare
from fxpasses.commands.tp_run.pool import TPPool
from fxpasses.commands.tp_run.tiny_decoder import BUNDLED_CONFIG, DecoderSpec
from fxpasses.config import FxPassesConfig, parse_strategies
from fxpasses.errors import ConfigError
from fxpasses.strategies.tp_family import TP_GRAPHS

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
    what = "an MLA" if any(k.startswith(("kv_lora", "q_lora")) for k in found) else "an MoE"
    mt = cfg.get("model_type")
    arch = f"--arch {mt}" if mt in CONFIG_CLASSES else "--arch qwen3_moe|qwen2_moe|deepseek_v2"
    raise ConfigError(
        f"{config_path} is {what} model config ({', '.join(found)}); `fxpasses dump` builds dense decoders only "
        f"(Llama, Mistral, Qwen2, Qwen3). Check it in vLLM's engine instead: `fxpasses check --model "
        f"{Path(config_path).resolve().parent}` (the checkpoint directory with this config.json and its weights), "
        f"or `fxpasses check {arch}` for a tiny random checkpoint of that architecture")


def run_dump(args: argparse.Namespace) -> int:
    """The `demo` / `dump` command on its parsed arguments (`fxpasses.cli`)."""
    config_path, tp, strategy, tokens, out = getattr(args, "config", None), args.tp, args.strategy, args.tokens, args.out
    dtype, allreduce_form, layers, patterns = args.dtype, args.allreduce_form, args.layers, args.patterns
    sizes = {k: v for k in ("flashcomm2_oproj_tp_size", "otp_size", "mlp_tp_size") if (v := getattr(args, k)) is not None}
    if config_path:
        refuse_engine_only_config(config_path)

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
                             False, first_tokens=max(tokens))
        if dp:  # every rank feeds its own tokens (same count), compared with its own TP=1 output
            results = pool.run(rank_compare_own_tokens, summaries[0]["key"], tokens)
        else:
            results = pool.run(rank_compare, summaries[0]["key"], tokens)
    tol = DEMO_TOLERANCE[dtype]
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
