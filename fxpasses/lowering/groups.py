"""What the platform backends need to know about a process group, found outside compilation.

Owns two registries filled at worker start (`prepare(config, ctx, groups)`, called by
`fxpasses.worker_groups.prepare_process_groups`, which the vLLM plugin calls right after vLLM's groups
exist and the harness before capturing) and read, never filled, inside a compilation:

* the HCCL communicator name of a group (`npu` backend): torch_npu's fused kernels take the
  communication domain by name (`hcom`), which the seed read with
  `group._get_backend(torch.device("npu")).get_hccl_comm_name(global_rank)`;
* the groups with torch symmetric memory enabled (`cuda` backend): `symm_mem` fused kernels run
  only on such groups; `enable_symm_mem_for_group` is called here, never during a compile.

Both are keyed by the c10d group name and, where it has one, the vLLM name ("tp:0").
`platform()` says which backend `lowering: auto` picks on this machine.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("fxpasses")

_HCOM: dict[str, str] = {}
_SYMM: set[str] = set()


def platform() -> str:
    """"npu" where torch_npu is installed (vllm-ascend), "cuda" where CUDA is, else "cpu"."""
    try:
        npu = importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):  # a module object without a spec in sys.modules
        npu = False
    if npu:
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def register_hcom_name(names, hcom: str) -> None:
    for n in names:
        if n:
            _HCOM[str(n)] = hcom


def hcom_name(group_name: str) -> str | None:
    return _HCOM.get(str(group_name))


def register_symm_mem_group(names) -> None:
    for n in names:
        if n:
            _SYMM.add(str(n))


def symm_mem_enabled(group_name: str) -> bool:
    return str(group_name) in _SYMM


def clear() -> None:
    _HCOM.clear()
    _SYMM.clear()


def prepare(config, ctx, groups) -> None:
    """Record the HCCL names (npu) or enable symmetric memory (cuda) for `groups`, the (c10d name,
    vLLM name) of every group `config` may fuse over, on this rank, now (worker start). Nothing on
    CPU, nothing with `lowering: off` or `reference`. A failure is logged and leaves the group unregistered (its sites are then refused
    with that reason)."""
    mode = getattr(config, "lowering", "off")
    if mode != "auto" or ctx.tp_group is None:
        return
    plat = platform()
    if plat == "cpu":
        return
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for c10d_name, vllm_name in groups:
        try:
            pg = _resolve_process_group(c10d_name)
            if plat == "npu":
                me = dist.get_global_rank(pg, dist.get_rank(pg))
                name = pg._get_backend(torch.device("npu")).get_hccl_comm_name(me)
                register_hcom_name((c10d_name, vllm_name), name)
            elif dist.get_backend(pg) == "nccl":
                from torch.distributed._symmetric_memory import enable_symm_mem_for_group

                enable_symm_mem_for_group(c10d_name)
                register_symm_mem_group((c10d_name, vllm_name))
        except Exception as e:  # the sites over this group are refused, naming it
            log.warning("fxpasses lowering: group %s gets no fused kernels: %s: %s", c10d_name,
                        type(e).__name__, e)
