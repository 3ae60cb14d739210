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
* `fxpasses::odp_quant_blocks(w, scale, bias, per_token, out_dtype, key, group_name, group_size)`:
  FlashComm2's blocks for a quantised (W8A8) o_proj, gathered over the ODP group once per weight
  version like `odp_weight`: (the n peers' int8 weight shards [n, D/tp, H], their dequant scales
  [n, H], the row bias terms [2, H] summed over the group). A bias term is this rank's row bias
  where its graph has one (vLLM's TP rank 0), zeros elsewhere: a float bias (added after the
  dequant) in row 0; an integer bias (vllm-ascend's int32 quant_bias, added to the int32
  accumulator) times the dequant scale, in row 0, or in row 1 when the matmul also scales per
  token (then it is multiplied by the first peer's per-token scale). Terms are in out_dtype
  promoted to at least float32.
* the lowering's ops (`fxpasses::mm_all_reduce`, `mm_reduce_scatter`, `all_gather_mm`, `rank0_bias`),
  defined in `fxpasses.lowering.ops` and registered from here.
* `fxpasses::boundary_shard(x, rank, group_size)`: this rank's rows of a token tensor crossing a piece
  boundary of vLLM's FX split (`fxpasses.piece_boundaries`), padded to a multiple of the group size.
* `fxpasses::check_group_tokens(x, group_name, group_size, where)`: OTP / MLP-TP debug check that
  every rank of a group runs the same token count (raises the same clear error on every rank).
"""
from __future__ import annotations

import threading

import torch

from fxpasses.piece_boundaries import boundary_shard as _boundary_shard  # noqa: F401  (fxpasses::boundary_shard)
from fxpasses.lowering import ops as _lowering_ops  # noqa: F401  (fused reference ops, fxpasses::rank0_bias)
from fxpasses.lowering.ops import tensor_version

_LOCK = threading.Lock()
_WEIGHTS: dict[str, tuple[tuple, torch.Tensor]] = {}
STATS = {"calls": 0, "gathers": 0, "bytes": 0}


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
    ident = (tensor_version(w), tensor_version(bias))
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


def _gather_blocks(t: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    flat = t.contiguous().reshape(1, -1)
    out = flat.new_empty((group_size, flat.shape[1]))
    dist.all_gather_into_tensor(out, flat, group=_resolve_process_group(group_name))
    return out.view(group_size, *t.shape)


def bias_terms(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
               out_dtype: torch.dtype) -> torch.Tensor:
    """This rank's [2, H] bias terms (see the module docstring)."""
    dt = torch.promote_types(out_dtype, torch.float32)
    terms = torch.zeros((2, w.shape[-1]), dtype=dt, device=w.device)
    if bias is not None:
        if bias.is_floating_point():
            terms[0] = bias.to(dt)
        else:
            terms[1 if per_token else 0] = (bias.to(torch.float64) * scale.to(torch.float64)).to(dt)
    return terms


@torch.library.custom_op("fxpasses::odp_quant_blocks", mutates_args=())
def odp_quant_blocks(w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
                     out_dtype: torch.dtype, key: str, group_name: str,
                     group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    ident = (tensor_version(w), tensor_version(scale), tensor_version(bias), per_token, out_dtype)
    with _LOCK:
        STATS["calls"] += 1
        hit = _WEIGHTS.get(key)
        if hit is not None and hit[0] == ident:
            return hit[1]
    full = (_gather_blocks(w, group_name, group_size), _gather_blocks(scale, group_name, group_size),
            _gather_blocks(bias_terms(w, scale, bias, per_token, out_dtype), group_name, group_size).sum(0))
    with _LOCK:
        _WEIGHTS[key] = (ident, full)
        STATS["gathers"] += 1
        STATS["bytes"] += sum(t.numel() * t.element_size() for t in full)
    return full


@odp_quant_blocks.register_fake
def _odp_quant_blocks_fake(w, scale, bias, per_token, out_dtype, key, group_name, group_size):
    dt = torch.promote_types(out_dtype, torch.float32)
    return (w.new_empty((group_size, *w.shape)), scale.new_empty((group_size, *scale.shape)),
            w.new_empty((2, w.shape[-1]), dtype=dt))


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
