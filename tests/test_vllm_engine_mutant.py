"""The engine comparison can fail: `fxpasses check` against a named mutant of the rewrite that moves
rows exits 1, at TP=2 and at TP=4, in vLLM's real CPU engine.

The mutant (`fxpasses.testing.mutants.reduce_scatter_rows_of_the_next_rank`) hands every rank the
next rank's rows out of each reduce-scatter: the sums are right, the rows are not the rank's own, so
tokens move between positions (a fault that reorders a sum would not show at TP=2, where a
reduce-scatter adds the same two numbers as an all-reduce). The test suite's vLLM plugin activates it
in every process of the engine with the pass (`FXPASSES_TESTING_MUTANT`, `check.run_check(pass_env=)`);
the baseline engine runs without the pass and is the session's shared run
(`check.run_check(baseline_cache=)`): at TP=2 the same one `test_check_cli`'s end-to-end check (the
control without the mutant) compares against; at TP=4 the one of `test_vllm_engine_flashcomm2`'s TP=4
case, whose plain weights (`FXPASSES_CPU_PLAIN_WEIGHTS=1`, in both engines) this check takes too, and
whose FlashComm1+FlashComm2 run equal to it is the control. Each run must have rewritten the graph
on every rank, so the verdict is the mutant's, not a failed rewrite.
"""
from __future__ import annotations

import pytest

from fxpasses import cpu_plain_weights
from fxpasses.commands import check
from fxpasses.testing import mutants

pytestmark = pytest.mark.engine  # starts vLLM engines: the second tier (tools/test.sh)

MUTANT = "reduce_scatter_rows_of_the_next_rank"


def _check(tp, workdir, baseline_cache):
    env = {cpu_plain_weights.ENV: "1"} if tp == 4 else None   # the TP=4 baseline shared with FlashComm2's
    return check.run_check(None, tp, "flashcomm1", arch="llama", workdir=workdir, baseline_cache=baseline_cache,
                           env=env, pass_env={mutants.ENV: MUTANT}, progress=lambda line: None)


def _caught(res, tp):
    # both engines ran to the end: the verdict comes from their outputs, never from a crash
    assert "the engine with the pass failed" not in res.message, res.message[-3000:]
    assert sorted(res.applied_ranks) == list(range(tp)), res.message
    assert res.collectives_after.get("reduce_scatter", 0) >= 5 and not res.collectives_after.get("all_reduce"), \
        res.collectives_after
    assert res.exit_code == check.EXIT_DIFFERENT, res.message
    assert not res.outputs_equal and "DIFFERENT" in res.message, res.message


def test_check_exits_1_when_the_rewrite_moves_rows_tp2(tmp_path, baseline_cache, engine_log):
    _caught(engine_log(_check(2, tmp_path, baseline_cache)), 2)


def test_check_exits_1_when_the_rewrite_moves_rows_tp4(tmp_path, baseline_cache, engine_log):
    _caught(engine_log(_check(4, tmp_path, baseline_cache)), 4)
