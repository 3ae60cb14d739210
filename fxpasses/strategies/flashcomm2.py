"""FlashComm2: the o_proj / out_proj all-reduce becomes an all-to-all over ODP ("store more, send less").

K = o_proj TP size (config `flashcomm2_oproj_tp_size`, 1 <= K < tp, K | tp), n = tp / K, r = TP rank,
ODP = contiguous blocks of n ranks (K=1: the TP group), OTP = strided groups of K ranks
(see `fxpasses.topology`). This rank computes o_proj columns s = r div n of the weight.

Before (vanilla TP)::

    y = all_reduce(mm(x, w.T))                         # x [T, D/tp] (own heads), w [H, D/tp]

After::

    xp  = pad(x)                                       # [T_pad, D/tp], T_pad = T + (-T) mod tp
    c   = xp.view(K, n, b, D/tp).permute(1, 0, 2, 3)   # tp chunks of b = T_pad/tp rows, reordered
                                                       #   to ids [[i + j*n for j] for i] (K > 1 only)
    a   = all_to_all_single(c.view(T_pad, D/tp), odp)  # n equal splits of K*b rows
    a   = a.view(n, K*b, D/tp).permute(1, 0, 2).reshape(K*b, D/K)   # peers' heads side by side
    wo  = fxpasses.odp_weight(w, key, odp)             # [H, D/K]: w all-gathered over ODP, once
    o   = mm(a, wo.T)                                  # [K*b, H], partial over OTP
    y   = reduce_scatter(o, otp)       if K > 1        # [b, H] = padded token chunk r: Shard0(TP)
    y   = all_gather(y, tp)[:T]        without FlashComm1 (with it, Shard0 chains into propagation)

The o_proj weight a rank needs ([H, D/K], the all-gather of the TP shards over its ODP group; K=1:
the full weight) is produced by the custom op `fxpasses::odp_weight`, which all-gathers on its first
call for a parameter and returns the cached tensor afterwards: one transfer per parameter, not per
step. `clear_weight_cache()` drops the cache (call it on every rank after reloading weights).

Skipped, with the reason, on every rank alike: sites whose weight is not visible (packed
`_C.onednn_mm`), whose row bias is added on TP rank 0 only (`addmm` in rank 0's graph), whose
all-reduce is not the TP one or does not directly reduce the matmul.
"""
from __future__ import annotations

import operator
import threading

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import topology
from fxpasses.context import TPContext
from fxpasses.errors import ConfigError, RewriteError
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies.base import Strategy, register

aten = torch.ops.aten

# ---- the weight op: all-gather over ODP once per parameter ---------------------------------------

_LOCK = threading.Lock()
_WEIGHTS: dict[str, tuple[tuple, torch.Tensor]] = {}
STATS = {"calls": 0, "gathers": 0, "bytes": 0}


def _ident(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), tuple(w.shape), w.dtype, str(w.device))


def _gather_odp_weight(w: torch.Tensor, group_name: str, group_size: int) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    h, dl = w.shape
    out = w.new_empty((group_size * h, dl))
    dist.all_gather_into_tensor(out, w.contiguous(), group=_resolve_process_group(group_name))
    # [n*H, D/tp] (peer-major) -> [H, n*D/tp]: peer p's columns at [p*D/tp, (p+1)*D/tp)
    return out.view(group_size, h, dl).permute(1, 0, 2).reshape(h, group_size * dl).contiguous()


@torch.library.custom_op("fxpasses::odp_weight", mutates_args=())
def odp_weight(w: torch.Tensor, key: str, group_name: str, group_size: int) -> torch.Tensor:
    """w [H, D/tp] (this rank's o_proj shard) -> [H, group_size * D/tp], gathered over the group
    on the first call for `key` (and again only if the parameter tensor itself is replaced)."""
    with _LOCK:
        STATS["calls"] += 1
        hit = _WEIGHTS.get(key)
        if hit is not None and hit[0] == _ident(w):
            return hit[1]
    full = _gather_odp_weight(w, group_name, group_size)
    with _LOCK:
        _WEIGHTS[key] = (_ident(w), full)
        STATS["gathers"] += 1
        STATS["bytes"] += full.numel() * full.element_size()
    return full


@odp_weight.register_fake
def _odp_weight_fake(w, key, group_name, group_size):
    return w.new_empty((w.shape[0], group_size * w.shape[1]))


def clear_weight_cache() -> None:
    with _LOCK:
        _WEIGHTS.clear()


def weight_stats() -> dict:
    with _LOCK:
        return {**STATS, "cached": len(_WEIGHTS)}


# ---- the strategy ---------------------------------------------------------------------------------

class FlashComm2(Strategy):
    name = "flashcomm2"
    aliases = ("fc2",)
    site_kinds = frozenset({"row"})
    precedence = 20

    def validate(self, config, tp, world):
        topology.check_flashcomm2_sizes(tp, config.flashcomm2_oproj_tp_size)

    def prepare_groups(self, config, ctx):
        if ctx.tp < 2 or ctx.tp_group is None:
            return None
        return topology.flashcomm2_groups(ctx, config.flashcomm2_oproj_tp_size)

    def precheck(self, plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
        return _precheck(plan, rw, ctx)

    def rewrite(self, rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
        mine = self.mine(plans)
        if not mine:
            return
        k = rw.config.flashcomm2_oproj_tp_size
        try:
            topology.check_flashcomm2_sizes(ctx.tp, k)
        except ConfigError as e:
            for p in mine:
                p.skip(str(e))
            return
        reasons = _agree({p.site.prefix: self.precheck(p, rw, ctx) for p in mine}, ctx)
        todo = []
        for p in mine:
            why = reasons.get(p.site.prefix)
            if why:
                p.skip(why)
            else:
                todo.append(p)
        if not todo:
            return
        groups = self.prepare_groups(rw.config, ctx)
        if rw.n != groups.tp:  # the token padding (rw.shard_rows) is per TP rank
            raise RewriteError(f"FlashComm2 needs the rewriter on the TP group (size {groups.tp}), got size {rw.n}")
        gather_after = "flashcomm1" not in rw.config.strategies
        total = 0
        for p in todo:
            extra = _rewrite_site(rw, p, groups, gather_after)
            total += extra
            p.done(f"all_reduce -> pad + {'reorder + ' if k > 1 else ''}all_to_all over odp{list(groups.odp.ranks)}"
                   f" + mm with o_proj columns block {groups.shard}/{k}"
                   + (f" + reduce_scatter over otp{list(groups.otp.ranks)}" if k > 1 else "")
                   + (" + all_gather over tp + unpad" if gather_after else " (Shard0 over tp)")
                   + f"; o_proj weight gathered once over odp: +{extra / 1024:.1f} KiB on this rank")
        rw.notes.append(f"flashcomm2: K={k}, n={groups.n}, extra o_proj weight memory {total / 1024:.1f} KiB per rank")
        key = "flashcomm2_extra_weight_bytes_per_rank"
        rw.extra[key] = rw.extra.get(key, 0) + total


# ---- planning checks ----------------------------------------------------------------------------

def _precheck(plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
    """The reason this site cannot be rewritten on this rank, or None."""
    site = plan.site
    if site.kind != "row":
        return f"FlashComm2 rewrites row-parallel o_proj/out_proj sites, not {site.kind} sites"
    ar = site.all_reduce
    if ar is None:
        return "no TP all-reduce follows this layer (reduce_results=False or already rewritten)"
    if not ar.runs_on(ctx.tp_group):
        return f"its all-reduce runs on group {ar.group_name!r}, not the TP group"
    mm = site.matmul
    if mm is None:
        return "no matmul found inside the layer"
    if site.weight is None:
        return (f"the weight is not visible in the graph ({gf.op_name(mm)}: packed weight); FlashComm2 needs "
                "the o_proj weight to all-gather it over the ODP group")
    if site.bias is not None or gf.op_name(mm) == "aten::addmm":
        return ("row bias: it is added on TP rank 0 only (addmm in rank 0's graph), which the all-to-all "
                "form cannot reproduce on the other ranks")
    if gf.op_name(mm) != "aten::mm":
        return f"matmul form {gf.op_name(mm)} is not supported (aten.mm with a transposed weight is)"
    if ar.input is not mm:
        return "the all-reduced tensor is not the o_proj matmul output"
    if not rw.is_token(ar.input) or not rw.is_token(site.input):
        return "the matmul's dim 0 is not the token dimension"
    if site.weight.op not in ("placeholder", "get_attr"):
        return "the weight is computed in the graph (not a parameter); it cannot be gathered once"
    x, w, wt = gf.val(site.input), gf.val(site.weight), gf.val(mm.args[1])
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and w.dim() == 2):
        return "input and weight must be 2-D"
    if wt is None or tuple(wt.shape) != (w.shape[1], w.shape[0]) or mm.args[1] is site.weight:
        return "the matmul does not use the transposed [H, D/tp] weight"
    if not gf.same_size(x.shape[1], w.shape[1]) or isinstance(w.shape[1], torch.SymInt):
        return "the input features do not match the weight shard"
    return None



def _agree(reasons: dict[str, str | None], ctx: TPContext) -> dict[str, str | None]:
    """Make every TP rank take the same decision per site (a row bias exists in rank 0's graph
    only, so rank 0 alone sees it): a site is skipped everywhere when any rank skips it."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return reasons
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        pg = _resolve_process_group(ctx.tp_group.c10d_name)
    except Exception:
        return reasons
    got: list = [None] * ctx.tp
    with unset_fake_temporarily():
        dist.all_gather_object(got, reasons, group=pg)
    out = dict(reasons)
    for r, theirs in enumerate(got):
        for prefix, why in (theirs or {}).items():
            if why and not out.get(prefix):
                out[prefix] = f"skipped on every rank because TP rank {r} cannot rewrite it: {why}"
    return out


# ---- the rewrite of one site ---------------------------------------------------------------------

def _rewrite_site(rw: LayoutRewriter, plan: SitePlan, groups, gather_after: bool) -> int:
    """Rewrite one site; returns the bytes of the ODP weight this rank keeps."""
    g, site = rw.graph, plan.site
    mm, x, w, ar = site.matmul, site.input, site.weight, site.all_reduce
    tp, k, n = groups.tp, groups.k, groups.n
    wv = gf.val(w)
    h, dl = int(wv.shape[0]), int(wv.shape[1])

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    first = mm.prev
    with g.inserting_before(mm):
        pad, _ = rw.padded_count()
        b = rw.shard_rows()                                   # rows per TP chunk = T_pad / tp
        kb = rw.sym(operator.mul, b, k) if k > 1 else b      # rows exchanged with each ODP peer
        xp = call(aten.constant_pad_nd.default, x, [0, 0, 0, pad], 0.0)
        if k > 1:
            # chunk c = j*n + i  ->  order (i, j): ids [[i + j*n for j in range(K)] for i in range(n)]
            v = call(aten.view.default, xp, [k, n, b, dl])
            v = call(aten.permute.default, v, [1, 0, 2, 3])
            v = call(aten.clone.default, v, memory_format=torch.contiguous_format)
            send = call(aten.view.default, v, [rw.sym(operator.mul, kb, n), dl])
        else:
            send = xp
        a2a = rw.comm.all_to_all(g, send, groups.odp, kb)     # [n*K*b, D/tp], block p from ODP peer p
        y = call(aten.view.default, a2a, [n, kb, dl])
        y = call(aten.permute.default, y, [1, 0, 2])
        y = call(aten.clone.default, y, memory_format=torch.contiguous_format)
        y = call(aten.view.default, y, [kb, n * dl])          # [T_pad/n, D/K]
        key = f"{site.prefix}|odp={groups.odp.c10d_name}|{','.join(map(str, groups.odp.ranks))}"
        wo = call(torch.ops.fxpasses.odp_weight.default, w, key, groups.odp.c10d_name, n)
        wo.meta["fxpasses"] = {"role": "odp_weight", "weight_collective": "all_gather_once",
                               "group": groups.odp.label, "group_size": n}
        wt = call(aten.permute.default, wo, [1, 0])
        out = call(aten.mm.default, y, wt)                    # [T_pad/n, H], partial over OTP
        res = rw.comm.reduce_scatter(g, out, groups.otp) if k > 1 else out
    # register everything inserted (so propagation leaves it alone) and copy the layer's stack
    stack = mm.meta.get("nn_module_stack")
    node = first.next
    while node is not mm:
        rw.mark_created(node)
        node.meta.setdefault("fxpasses", {}).setdefault("role", "flashcomm2")
        if stack is not None:
            node.meta.setdefault("nn_module_stack", stack)
        node = node.next
    rw.mark_shard0(res, 2)
    final = rw.gather(res) if gather_after else res
    rw.replace_all_reduce(ar, final)
    for node in (mm, mm.args[1]):
        if isinstance(node, fx.Node) and not node.users:
            g.erase_node(node)
    return h * n * dl * wv.element_size()


STRATEGY = register(FlashComm2())
