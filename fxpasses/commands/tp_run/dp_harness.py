"""Equivalence for the DP-attention strategies (OTP, MLP-TP): every rank feeds its OWN tokens.

Use with a `TPPool(world, tp=1)` and `harness.rank_capture` (which compiles once per shape); then
`pool.run(rank_compare_own_tokens, key, token_counts)` runs, for each token count B (the same on every
rank of a group, as OTP/MLP-TP require), the original TP=1 graph and the rewritten graph on this
rank's own token ids and compares them.
"""
from __future__ import annotations

import torch

from fxpasses.commands.tp_run.harness import compare_outputs, graph_args


def own_tokens(T: int, vocab: int, seed: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + T * 131 + rank * 1_000_003 + 17)
    return torch.randint(0, vocab, (T,), generator=g)


def rank_compare_own_tokens(state: dict, key: str, token_counts: list[int], seed: int = 0) -> list[dict]:
    ds, rank = state["captures"][key]["spec"], state["rank"]
    out = []
    with torch.no_grad():
        for T in token_counts:
            ids = own_tokens(T, ds.vocab_size, seed, rank)
            res = compare_outputs(*graph_args(state, key, T, ids=ids), T)
            out.append({**res, "ids_digest": int(ids.sum().item())})  # ranks really fed different tokens
    return out


def rank_run_rewritten(state: dict, key: str, counts_by_rank: list[int], seed: int = 0) -> str:
    """Run only the rewritten graph with a per-rank token count; returns "ok" or the error text
    (used to show the equal-token-count check fires instead of hanging)."""
    ds, rank = state["captures"][key]["spec"], state["rank"]
    ids = own_tokens(counts_by_rank[rank], ds.vocab_size, seed, rank)
    cap, args = graph_args(state, key, counts_by_rank[rank], ids=ids)
    try:
        with torch.no_grad():
            cap.graphs[0](*list(args))
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "ok"
