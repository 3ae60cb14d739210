"""Engine throughput without and with the pass: the workloads of `fxpasses check --bench N`.

Two workloads run inside each engine, after the check's correctness prompts (`run_workloads`):

  prefill   PREFILL.prompts prompts of PREFILL.prompt_len tokens, one token generated each
  decode    DECODE.prompts prompts of DECODE.prompt_len tokens, DECODE.generate tokens generated each

Each is run once to warm up (first-touch allocations, the KV cache), then timed `repeats` times in
that engine; the fastest run counts. The driver (`fxpasses.commands.check.run_check`) starts the engines
alternately, baseline then pass, for N rounds, so slow drift of the machine hits both alike;
`summarise` keeps each side's best over the rounds and states the ratio of the pass engine's
tokens/s to the baseline's (above 1: the pass is faster). Tokens/s counts prompt tokens for prefill
and generated tokens for decode; `ms_per_step` is the best wall time over the tokens generated per
sequence (for decode, one engine step of the whole batch; for prefill, the batch's prefill).
Nothing here asserts a speed: the numbers are printed and written to the check's JSON.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Workload:
    prompts: int
    prompt_len: int
    generate: int

    def tokens(self, kind: str) -> int:
        """The tokens a run of this workload counts for its tokens/s."""
        return self.prompts * (self.prompt_len if kind == "prefill" else self.generate)


PREFILL = Workload(prompts=16, prompt_len=200, generate=1)
DECODE = Workload(prompts=16, prompt_len=8, generate=64)
WORKLOADS = {"prefill": PREFILL, "decode": DECODE}
REPEATS = 3


def max_model_len() -> int:
    """The engine length every workload fits in."""
    return max(w.prompt_len + w.generate for w in WORKLOADS.values())


def spec(repeats: int = REPEATS) -> dict[str, Any]:
    """The part of an engine spec that asks the worker to run the workloads."""
    return {"repeats": repeats, "workloads": {k: asdict(w) for k, w in WORKLOADS.items()}}


def run_workloads(llm, bench: dict, prompt_ids: Callable[[int, int], list[int]]) -> dict[str, dict]:
    """In an engine worker: {workload: {"s": best wall seconds, "runs": [...]}} (`bench` from `spec`).
    `prompt_ids(n, seed)`: a prompt of n token ids."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = {}
    for kind, w in bench["workloads"].items():
        w = Workload(**w)
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids(w.prompt_len, 1000 + i)) for i in range(w.prompts)]
        sp = SamplingParams(temperature=0.0, max_tokens=w.generate, ignore_eos=True)
        llm.generate(prompts, sp, use_tqdm=False)  # warm-up
        runs = []
        for _ in range(int(bench["repeats"])):
            t0 = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            runs.append(time.perf_counter() - t0)
        out[kind] = {"s": min(runs), "runs": [round(r, 4) for r in runs]}
    return out


def summarise(rounds: list[dict[str, dict]], workloads: dict[str, dict] | None = None) -> dict[str, dict]:
    """{workload: tokens/s and ms per step of each side, their ratio} from the engines' results:
    `rounds` = [{"baseline": run_workloads(...), "pass": run_workloads(...)}, ...]; the best (smallest)
    time of each side over the rounds counts."""
    workloads = workloads or {k: asdict(w) for k, w in WORKLOADS.items()}
    out = {}
    for kind, w in workloads.items():
        w = Workload(**w)
        row: dict[str, Any] = {"rounds": len(rounds)}
        for side in ("baseline", "pass"):
            times = [r[side][kind]["s"] for r in rounds if r.get(side) and kind in r[side]]
            if not times:
                row[side] = None
                continue
            best = round(min(times), 6)  # the rates below are computed from the time as reported
            row[side] = {"tok_s": round(w.tokens(kind) / best, 1), "ms_per_step": round(1e3 * best / w.generate, 3),
                         "best_s": best, "times_s": [round(t, 6) for t in times]}
        row["ratio"] = (round(row["pass"]["tok_s"] / row["baseline"]["tok_s"], 3)
                        if row["baseline"] and row["pass"] else None)
        out[kind] = row
    return out


def format_rows(summary: dict[str, dict]) -> list[str]:
    """Report lines: one per workload."""
    lines = []
    for kind, row in summary.items():
        b, p = row.get("baseline"), row.get("pass")
        if not b or not p:
            lines.append(f"  {kind:8s} not measured (an engine failed)")
            continue
        lines.append(f"  {kind:8s} {b['tok_s']:9.1f} -> {p['tok_s']:9.1f} tokens/s  ({row['ratio']:.3f}x; "
                     f"{b['ms_per_step']:.1f} -> {p['ms_per_step']:.1f} ms per step; best of {row['rounds']} "
                     "rounds, engines alternating)")
    return lines
