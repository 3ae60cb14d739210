"""The `fxpasses::` ops lowered graphs call (the CPU reference backend and the rank-0 bias), registered
when `fxpasses` is imported (through `fxpasses.runtime_ops`), so a graph loaded from a compile cache
in a new process finds them.

Reference fused ops (weights as the graph holds them, `w` = the [K, N] operand of `mm(x, w)`):

* `fxpasses::mm_all_reduce(x, w, bias, group_name, group_size)` = all_reduce(x @ w [+ bias]) over
  the c10d group `group_name`; the bias is passed by TP rank 0 only (vLLM's row bias), so it is
  added once, before the reduction, as `npu_mm_all_reduce_base` does.
* `fxpasses::mm_reduce_scatter(x, w, bias, group_name, group_size)` = reduce_scatter(x @ w [+ bias])
  along dim 0; x's rows (already padded) divide by the group size.
* `fxpasses::all_gather_mm(x, w, bias, group_name, group_size)` = (all_gather(x) @ w [+ bias],
  all_gather(x)), as `npu_all_gather_base_mm` returns (output, gather_out).

Their CPU kernels decompose into the very matmul the graph had (`torch.mm` / `torch.addmm`) and the
collective over the named c10d group (gloo on CPU), so the fused graph computes bit for bit what
the unfused one did; their fake kernels give the shapes. They exist to prove the lowering here; the
platform backends emit the platform's own kernels.

* `fxpasses::rank0_bias(bias, like, key, group_name, group_size, n, dtype)`: the row bias only TP rank 0's graph
  holds (vLLM adds a row layer's bias on rank 0 only), made known to every rank of the group by one
  all-reduce of [N] (bias on the rank that has it, zeros elsewhere), cached per `key` and version
  of `like` (the layer's weight, present on every rank) and redone only when that changes, never
  per step. A fused matmul-reduce-scatter kernel that takes no bias adds it to every rank's chunk
  after the reduction, exactly once per token, with every rank taking the same path.
"""
from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_BIASES: dict[str, tuple[tuple, torch.Tensor]] = {}
STATS = {"rank0_bias_calls": 0, "rank0_bias_reduces": 0}


def _pg(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


@torch.library.custom_op("fxpasses::mm_all_reduce", mutates_args=())
def mm_all_reduce(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_name: str,
                  group_size: int) -> torch.Tensor:
    """See the module docstring."""
    import torch.distributed as dist

    out = _mm(x, w, bias)
    # a real kernel: it runs when the lowered graph executes (all ranks in step); while a graph is
    # compiled only the fake kernel runs, so no collective is issued inside a compilation
    dist.all_reduce(out, group=_pg(group_name))
    return out


@mm_all_reduce.register_fake
def _(x, w, bias, group_name, group_size):
    return x.new_empty((x.shape[0], w.shape[1]))


@torch.library.custom_op("fxpasses::mm_reduce_scatter", mutates_args=())
def mm_reduce_scatter(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_name: str,
                      group_size: int) -> torch.Tensor:
    """See the module docstring."""
    import torch.distributed as dist

    full = _mm(x, w, bias).contiguous()
    out = full.new_empty((full.shape[0] // group_size, full.shape[1]))
    dist.reduce_scatter_tensor(out, full, group=_pg(group_name))
    return out


@mm_reduce_scatter.register_fake
def _(x, w, bias, group_name, group_size):
    return x.new_empty((x.shape[0] // group_size, w.shape[1]))


@torch.library.custom_op("fxpasses::all_gather_mm", mutates_args=())
def all_gather_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group_name: str,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    import torch.distributed as dist

    x = x.contiguous()
    gathered = x.new_empty((x.shape[0] * group_size, *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, x, group=_pg(group_name))
    return _mm(gathered, w, bias), gathered


@all_gather_mm.register_fake
def _(x, w, bias, group_name, group_size):
    rows = x.shape[0] * group_size
    return x.new_empty((rows, w.shape[1])), x.new_empty((rows, *x.shape[1:]))


def tensor_version(t: torch.Tensor | None):
    """What identifies a stored tensor's current contents: storage, in-place version, shape, dtype,
    device (None for None); a cache keyed by it misses after an in-place update (a weight reload)."""
    if t is None:
        return None
    try:
        v = t._version
    except RuntimeError:  # inference tensors keep no version counter
        v = None
    return (t.data_ptr(), v, tuple(t.shape), t.dtype, str(t.device))


@torch.library.custom_op("fxpasses::rank0_bias", mutates_args=())
def rank0_bias(bias: torch.Tensor | None, like: torch.Tensor, key: str, group_name: str,
               group_size: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The [n] bias term TP rank 0's graph holds, on every rank, in `dtype` (the caller passes the
    output dtype promoted to at least float32, which every rank knows). `like`: the layer's weight
    (its version keys the cache)."""
    import torch.distributed as dist

    ident = (tensor_version(like), tensor_version(bias))
    with _LOCK:
        STATS["rank0_bias_calls"] += 1
        hit = _BIASES.get(key)
        if hit is not None and hit[0][0] == ident[0]:
            return hit[1]
    b = (torch.zeros(n, dtype=dtype, device=like.device) if bias is None
         else bias.detach().to(dtype).reshape(n).clone())
    # kernel time only (the graph runs on every rank); compilation sees the fake kernel
    dist.all_reduce(b, group=_pg(group_name))
    with _LOCK:
        _BIASES[key] = (ident, b)
        STATS["rank0_bias_reduces"] += 1
    return b


@rank0_bias.register_fake
def _(bias, like, key, group_name, group_size, n, dtype):
    return like.new_empty((n,), dtype=dtype)


def clear_bias_cache() -> None:
    with _LOCK:
        _BIASES.clear()
