"""Small shared helpers for the tests (model specs, running a capture on a pool)."""
import contextlib
import dataclasses
import logging
import os
import random
import subprocess
import sys
from fractions import Fraction
from unittest import mock

from hypothesis import strategies as st

from fxpasses.commands.tp_run.harness import rank_capture, rank_compare
from fxpasses.commands.tp_run.tiny_decoder import BUNDLED_CONFIG, DecoderSpec


DEPTH = 5 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def examples(n: int) -> int:
    """n in the CI profile; 5n under HYPOTHESIS_PROFILE=deep. Every `max_examples` and every draw
    loop of the suite goes through it (tests/test_exploration.py checks that)."""
    return n * DEPTH


#: token-count sets each equivalence test compares per captured model shape and drawn seed (captures
#: are cached in the rank workers, so every set only costs eager runs of the two graphs)
TOKEN_SETS = examples(20)

#: the drawn seed the token-count sets are made from. Hypothesis's first example is its minimal one
#: (seed 0), and the sets made from seed 0 still differ from each other; drawing every set with
#: hypothesis inside one example would give TOKEN_SETS copies of the minimal list.
SEEDS = st.integers(0, 2**32 - 1)


def edge_counts(tp: int) -> set[int]:
    """Token counts every set contains: one token, fewer than tp, exactly tp, one more, and a count
    that pads (3 tp + 1)."""
    return {1, max(tp - 1, 1), tp, tp + 1, 3 * tp + 1}


def token_sets(seed: int, edges, hi: int = 300, n: int = TOKEN_SETS, size=(3, 6)) -> list[list[int]]:
    """n sorted token-count sets made from `seed`: each `edges` plus 3 to 6 counts drawn from 1..hi."""
    rng = random.Random(seed)
    return [sorted({rng.randint(1, hi) for _ in range(rng.randint(*size))} | set(edges)) for _ in range(n)]


def compare_many(pool, key, seed, edges, hi=300, fn=None, extra=()):
    """Compare original and rewritten graphs on every rank for each of the TOKEN_SETS token-count
    sets made from `seed` (`token_sets`); assert shapes and float64 exactness."""
    from fxpasses.commands.tp_run.harness import rank_compare
    for tokens in token_sets(seed, edges, hi):
        for rank, results in enumerate(pool.run(fn or rank_compare, key, tokens, *extra)):
            assert [r["T"] for r in results] == tokens
            for r in results:
                assert r["shape_ok"], (rank, tokens, r)
                assert r["rel"] <= 1e-12, (rank, tokens, r)


#: Explicit model shapes for the equivalence tests, per TP size. Hypothesis's first draw of a shape is
#: the minimal one (1 layer, no bias, heads = kv heads), so shapes are named cases instead, none
#: minimal: >= 2 layers, row and column biases, GQA != 1, q/k norm, and at TP=4 heads != tp.
SHAPES = {
    2: {
        "L2-gqa2-qkvbias-obias-qknorm": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=8, hidden_size=48, intermediate_size=96, vocab_size=128,
                                             qkv_bias=True, o_proj_bias=True, qk_norm=True),
        "L3-gqa8-kvreplicated-mlpbias": dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                                             head_dim=8, hidden_size=64, intermediate_size=160, vocab_size=128,
                                             o_proj_bias=True, mlp_bias=True),
    },
    4: {
        "L2-h8-gqa4-biases-qknorm": dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         head_dim=8, hidden_size=64, intermediate_size=128, vocab_size=256,
                                         qkv_bias=True, o_proj_bias=True, mlp_bias=True, qk_norm=True),
    },
}


def shape_cases(tp: int) -> list:
    """`SHAPES[tp]` as pytest params (id = the shape's name, value = the spec dict)."""
    import pytest
    return [pytest.param(bundled_spec(**kw), id=name) for name, kw in SHAPES[tp].items()]


def byte_ratio(report: dict) -> Fraction:
    """A site report's bytes per step, after / before, as an exact fraction (the report's own `ratio`
    is rounded to 4 digits); the byte counts must be whole numbers."""
    step = report["bytes_per_step"]
    before, after = step["before"], step["after"]
    assert float(before).is_integer() and float(after).is_integer() and before > 0, step
    return Fraction(int(after), int(before))


def bundled_spec(**kw) -> dict:
    return dataclasses.asdict(DecoderSpec.from_file(BUNDLED_CONFIG).replace(**kw))


def capture(pool, spec: dict, strategies=("flashcomm1",), dtype="float64", pack=False, **cfg):
    config = {"strategies": list(strategies), **cfg}
    return pool.run(rank_capture, spec, config, dtype, pack)


def compare(pool, summaries, tokens):
    return pool.run(rank_compare, summaries[0]["key"], list(tokens))


def rank_all_reduce_only_on_rank1(state):
    """Rank 1 all-reduces, rank 0 returns at once: rank 1 waits on a collective nobody else issues."""
    import torch
    import torch.distributed as dist

    if state["rank"] == 1:
        dist.all_reduce(torch.ones(1))
    return state["rank"]


def rank_id(state):
    return state["rank"]


#: the environment without any fxpasses / vllm-ascend setting (tests set exactly what they test)
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("FXPASSES_", "VLLM_ASCEND_"))}


@contextlib.contextmanager
def clean_fxpasses_env():
    """`CLEAN_ENV` as the environment, memoised pass configurations forgotten, and fxpasses' log
    records reaching the root logger (where caplog listens)."""
    from fxpasses import vllm_pass

    vllm_pass._RESOLVED.clear()  # resolved configurations are memoised per process
    fx = logging.getLogger("fxpasses")
    parent = fx.parent
    fx.parent = logging.getLogger()
    try:
        with mock.patch.dict(os.environ, CLEAN_ENV, clear=True):
            yield
    finally:
        fx.parent = parent


def rank_block_flashcomm1(block, module_prefix: str, make_input, tokens):
    """On a TPPool rank: compile `block` with FlashComm1 through the real pipeline on the live TP
    group (symbolic token count, traced at 7 tokens), then run its original and rewritten graphs on
    `make_input(T, generator)` for each T. Returns (pass report, [(original, rewritten) per T])."""
    import torch

    from fxpasses.config import FxPassesConfig
    from fxpasses.context import TPContext
    from fxpasses.pipeline import run_passes
    from fxpasses.commands.tp_run.capture import compile_with_pass, rebind_token_args

    reports = []
    config = FxPassesConfig(strategies=("flashcomm1",), module_prefix=module_prefix)
    compiled, cap = compile_with_pass(block, lambda gr: reports.append(run_passes(gr, config, TPContext.from_vllm())))
    g = torch.Generator().manual_seed(1)
    x0 = make_input(7, g)
    torch._dynamo.mark_dynamic(x0, 0)
    compiled(x0)
    outs = []
    for T in tokens:
        args = list(rebind_token_args(cap.first_args, x0, make_input(T, g)))
        outs.append((cap.originals[0](*args)[0], cap.graphs[0](*args)[0]))
    return reports[0], cap, outs


def run_python_together(argvs: list[list[str]], cwd, timeout: float = 300, at_once: int = 2) -> list[tuple[int, str]]:
    """`python ARGV...` for each argv, `at_once` interpreters at a time (this machine kind has 2
    cores, and the runs are mostly imports); (returncode, stderr) per argv, in order."""
    out = []
    for i in range(0, len(argvs), at_once):
        procs = [subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for argv in argvs[i:i + at_once]]
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    return out
