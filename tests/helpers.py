"""Small shared helpers for the tests (model specs, running a capture on a pool)."""
import dataclasses

from fxpasses.testing.harness import rank_capture, rank_compare
from fxpasses.testing.models.tiny import BUNDLED_CONFIG, DecoderSpec


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
