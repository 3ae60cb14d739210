"""Small shared helpers for the tests (model specs, running a capture on a pool)."""
import contextlib
import dataclasses
import logging
import os
from unittest import mock

from fxpasses.testing.harness import rank_capture, rank_compare
from fxpasses.testing.models.tiny import BUNDLED_CONFIG, DecoderSpec


DEPTH = 5 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def examples(n: int) -> int:
    """n in the CI profile; 5n under HYPOTHESIS_PROFILE=deep (for max_examples and draw loops)."""
    return n * DEPTH


#: token-count sets each equivalence test draws per captured model shape (captures are cached in the
#: rank workers, so every set only costs eager runs of the two graphs)
TOKEN_SETS = examples(20)


def compare_many(pool, key, data, strategy, fn=None, extra=()):
    """Draw TOKEN_SETS token-count sets with hypothesis (`strategy`), compare original and rewritten
    graphs on every rank for each; assert shapes and float64 exactness."""
    from fxpasses.testing.harness import rank_compare
    for i in range(TOKEN_SETS):
        tokens = data.draw(strategy, label=f"tokens[{i}]")
        for rank, results in enumerate(pool.run(fn or rank_compare, key, tokens, *extra)):
            assert [r["T"] for r in results] == tokens
            for r in results:
                assert r["shape_ok"], (rank, tokens, r)
                assert r["rel"] <= 1e-12, (rank, tokens, r)


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
    from fxpasses.testing.capture import compile_with_pass, rebind_token_args

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
