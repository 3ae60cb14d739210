"""The custom ops rewritten graphs call at run time, registered when `fxpasses` is imported.

A compiled graph loaded from vLLM's or Inductor's cache in a new process names these ops, so they
must exist before it runs: importing the package registers them (vLLM imports it in every process
through the plugin entry point).

* `fxpasses::odp_weight(w, bias, key, group_name, group_size)`: FlashComm2's o_proj weight block.
  This rank's shard w [H, D/tp], extended by one column (the row bias where this rank's graph has
  it, vLLM's TP rank 0; zeros elsewhere), all-gathered over the ODP group and laid out as
  [H, n*D/tp + 1]: the n peers' weight shards side by side, then the sum of their bias columns
  (the row bias in the ODP group of TP rank 0, zeros in the others).
  Gathered once per weight version: again only when w or the bias is replaced or updated in place
  (its version counter moves); every rank of a group loads and updates its weights together, so
  every rank takes the same path.
* `fxpasses::check_group_tokens(x, group_name, group_size, where)`: OTP / MLP-TP debug check that
  every rank of a group runs the same token count (raises the same clear error on every rank).
"""
from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_WEIGHTS: dict[str, tuple[tuple, torch.Tensor]] = {}
STATS = {"calls": 0, "gathers": 0, "bytes": 0}


def _version(t: torch.Tensor | None):
    if t is None:
        return None
    try:
        v = t._version
    except RuntimeError:  # inference tensors keep no version counter
        v = None
    return (t.data_ptr(), v, tuple(t.shape), t.dtype, str(t.device))


def _gather_odp_weight(w: torch.Tensor, bias: torch.Tensor | None, group_name: str,
                       group_size: int) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    col = bias.reshape(-1, 1).to(w.dtype) if bias is not None else w.new_zeros((w.shape[0], 1))
    ext = torch.cat([w, col], 1).contiguous()                    # [H, D/tp + 1]
    h, dl = ext.shape
    out = ext.new_empty((group_size * h, dl))
    dist.all_gather_into_tensor(out, ext, group=_resolve_process_group(group_name))
    # [n*H, D/tp+1] (peer-major) -> [H, n*D/tp + 1]: peer p's weight at [p*D/tp, (p+1)*D/tp), then
    # the peers' bias columns summed (only TP rank 0 contributes one)
    per_peer = out.view(group_size, h, dl)
    weights = per_peer[:, :, :-1].permute(1, 0, 2).reshape(h, group_size * (dl - 1))
    return torch.cat([weights, per_peer[:, :, -1:].sum(0)], 1).contiguous()


@torch.library.custom_op("fxpasses::odp_weight", mutates_args=())
def odp_weight(w: torch.Tensor, bias: torch.Tensor | None, key: str, group_name: str,
               group_size: int) -> torch.Tensor:
    """See the module docstring."""
    ident = (_version(w), _version(bias))
    with _LOCK:
        STATS["calls"] += 1
        hit = _WEIGHTS.get(key)
        if hit is not None and hit[0] == ident:
            return hit[1]
    full = _gather_odp_weight(w, bias, group_name, group_size)
    with _LOCK:
        _WEIGHTS[key] = (ident, full)
        STATS["gathers"] += 1
        STATS["bytes"] += full.numel() * full.element_size()
    return full


@odp_weight.register_fake
def _odp_weight_fake(w, bias, key, group_name, group_size):
    return w.new_empty((w.shape[0], group_size * w.shape[1] + 1))


def clear_weight_cache() -> None:
    with _LOCK:
        _WEIGHTS.clear()


def weight_stats() -> dict:
    with _LOCK:
        return {**STATS, "cached": len(_WEIGHTS)}


class TokenCountMismatch(RuntimeError):
    pass


@torch.library.custom_op("fxpasses::check_group_tokens", mutates_args=())
def check_group_tokens(x: torch.Tensor, group_name: str, group_size: int, where: str) -> torch.Tensor:
    """Raise on every rank of the group unless all of them hold the same x.shape[0]; returns a copy
    of x (so the check stays in the graph's data flow: debug mode only)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group_name)
    mine = torch.tensor([x.shape[0]], dtype=torch.int64)
    got = torch.empty(group_size, dtype=torch.int64)
    dist.all_gather_into_tensor(got, mine, group=pg)
    counts = got.tolist()
    if len(set(counts)) != 1:
        raise TokenCountMismatch(
            f"fxpasses {where}: token counts differ across the group (ranks {dist.get_process_group_ranks(pg)}): "
            f"{counts}. o_proj TP / MLP TP need the same number of tokens on every rank of a group; pad each "
            "data-parallel rank's batch to a common size (vLLM's DP padding does) before the model runs")
    return x.clone()


@check_group_tokens.register_fake
def _(x, group_name, group_size, where):
    return torch.empty_like(x)
