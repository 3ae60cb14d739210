"""Comparing two engines' greedy outputs: tokens, the logprobs of the chosen tokens, near-ties.

Two runs of one model that differ only in how the same sums are communicated (an all-reduce
against a reduce-scatter + all-gather, another kernel's order of additions) agree to rounding. In
float32 that leaves greedy tokens identical; in bfloat16 (about 3 significant digits) a tiny random
model's nearly flat distributions make two tokens tie to rounding now and then, and the greedy
choice flips. vLLM's own model tests judge such runs the same way (`check_logprobs_close`): a
sequence is compared token by token up to its first divergence; the divergence is accepted only
as a *near-tie*: each run's token is in the other run's top-k, in both runs (the gap between the
two tokens' logprobs in each run is reported with it); the sequence is not compared after it (the
contexts differ). What does catch a wrong collective is the rest: every prompt token's logprob
(teacher-forced, so never cut short by a divergence) and every generated token's logprob before
the divergence must agree within the tolerance, and a wrong shard or sum moves them by far more.

Each output is {"tokens": [[id, ...]], "logprobs": [[chosen lp, ...]], "prompt_logprobs": [[lp or
None, ...]], "topk": [[{str(id): lp}, ...]]} (`topk` optional: without it any divergence fails).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Comparison:
    tokens_equal: bool = True           # every sequence identical
    max_logprob_diff: float = 0.0       # over prompt logprobs and the common prefix of each sequence
    first_divergence: str = ""          # the first sequence that diverged, "" when none
    near_ties: list[str] = field(default_factory=list)   # divergences accepted as near-ties
    unexplained: list[str] = field(default_factory=list)  # divergences that are not near-ties

    @property
    def outputs_equal(self) -> bool:
        """Tokens identical, or diverging only at near-ties."""
        return not self.unexplained

    @property
    def divergence_to_report(self) -> str:
        """The first divergence that is not a near-tie, else the first divergence ("" when none)."""
        return self.unexplained[0] if self.unexplained else self.first_divergence


def _near_tie(base_top: dict, got_top: dict, b: int, g: int) -> tuple[bool, str]:
    """(is the flip b -> g a near-tie, what the two runs' top-k say about it)."""
    kb, kg = str(b), str(g)
    if kg not in base_top or kb not in got_top or kb not in base_top or kg not in got_top:
        return False, "a token is outside the other run's top-k"
    gap = max(base_top[kb] - base_top[kg], got_top[kg] - got_top[kb])
    return True, f"logprob gap {gap:.3g}"


def compare(base: dict, got: dict, lens: list[int], tol: float) -> Comparison:
    """Compare `got` against `base` (prompt i has lens[i] tokens)."""
    res = Comparison()
    if len(base["tokens"]) != len(got["tokens"]):
        res.tokens_equal = False
        res.unexplained.append(f"{len(got['tokens'])} outputs against {len(base['tokens'])}")
        res.first_divergence = res.unexplained[0]
        return res
    shapes = [[len(x) for x in run["prompt_logprobs"]] for run in (base, got)]
    if shapes[0] != shapes[1]:  # checked before zip, which would hide a missing prompt logprob
        res.tokens_equal = False
        res.unexplained.append(f"prompt logprobs of lengths {shapes[1]} against {shapes[0]}")
        res.first_divergence = res.unexplained[0]
        return res
    for b, g in zip(base["prompt_logprobs"], got["prompt_logprobs"]):
        for x, y in zip(b, g):
            if x is not None and y is not None:
                res.max_logprob_diff = max(res.max_logprob_diff, abs(x - y))
    for i, (bt, gt) in enumerate(zip(base["tokens"], got["tokens"])):
        k = next((j for j, (x, y) in enumerate(zip(bt, gt)) if x != y), None)
        if k is None and len(bt) != len(gt):
            k = min(len(bt), len(gt))
        common = len(bt) if k is None else k
        for x, y in zip(base["logprobs"][i][:common], got["logprobs"][i][:common]):
            res.max_logprob_diff = max(res.max_logprob_diff, abs(x - y))
        if k is None:
            continue
        res.tokens_equal = False
        where = f"prompt {i} ({lens[i]} tokens) at generated token {k}: {gt[k:k + 4]} != {bt[k:k + 4]}"
        res.first_divergence = res.first_divergence or where
        tie, why = False, "an output is shorter" if k >= min(len(bt), len(gt)) else "no top-k logprobs"
        if k < min(len(bt), len(gt)) and "topk" in base and "topk" in got:
            tie, why = _near_tie(base["topk"][i][k], got["topk"][i][k], bt[k], gt[k])
        (res.near_ties if tie else res.unexplained).append(f"{where} ({why})")
    return res
