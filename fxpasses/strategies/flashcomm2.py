"""FlashComm2: the o_proj / out_proj all-reduce becomes an all-to-all over ODP ("store more, send less").

K = o_proj TP size (config `flashcomm2_oproj_tp_size`, 1 <= K < tp, K | tp), n = tp / K, r = TP rank,
ODP = contiguous blocks of n ranks (K=1: the TP group), OTP = strided groups of K ranks
(see `fxpasses.topology`). This rank computes o_proj columns s = r div n of the weight.

Before (vanilla TP)::

    y = all_reduce(mm(x, w.T) [+ bias on TP rank 0])   # x [T, D/tp] (own heads), w [H, D/tp]

After::

    xp  = pad(x, T_pad - T rows)                       # [T_pad, D/tp]
    c   = xp.view(K, n, b, D/tp).permute(1, 0, 2, 3)   # tp chunks of b = T_pad/tp rows, reordered
                                                       #   to ids [[i + j*n for j] for i] (K > 1 only)
    a   = all_to_all_single(c.view(T_pad, D/tp), odp)  # n equal splits of K*b rows
    a   = a.view(n, K*b, D/tp).permute(1, 0, 2).reshape(K*b, n*D/tp)  # peers' heads side by side
    wo  = fxpasses.odp_weight(w, bias | None, key, odp)  # [H, n*D/tp + 1]: gathered once, last
                                                       #   column the row bias (zeros off ODP group 0)
    o   = addmm(wo[:, -1], a, wo[:, :-1].T)            # [K*b, H], partial over OTP
    y   = reduce_scatter(o, otp)       if K > 1        # [b, H] = padded token chunk r: Shard0(TP)
    y   = all_gather(y, tp)[:T]        without FlashComm1 (with it, Shard0 chains into propagation)

The row bias. vLLM adds a row layer's bias on TP rank 0 only, so only rank 0's graph has it. It
travels with the one-time weight gather, not with the activations: every rank appends a bias
column to its weight shard (the bias on rank 0, zeros elsewhere) and `odp_weight` sums the gathered
columns, so the ranks of TP rank 0's ODP group hold the bias and the others zeros. K = 1: each rank
adds it to its own token chunk, once per token. K > 1: the members of ODP group 0 are one per OTP
group, so the OTP reduce-scatter sums it in exactly once. Every rank emits the same addmm, so the
graph and every decision are the same on all ranks, and the step's wire bytes are the layout's own.

The o_proj weight block a rank needs is produced by `fxpasses::odp_weight`
(`fxpasses.runtime_ops`), which all-gathers once per weight version, not per step.

Skipped, with the reason, on every rank alike: sites whose weight is not visible (packed
`_C.onednn_mm`), whose weight the platform may keep in a private layout (Ascend NZ, see
`fxpasses.op_forms.weight_block_refusal` and the `weight_format` setting), whose all-reduce is not
the TP one or does not directly reduce the matmul. Matmul forms: aten.mm / aten.addmm against the
transposed weight, or a platform linear form reading the [H, D/tp] weight itself
(vllm-ascend's `vllm.unquantized_gemm(x, weight, bias)`), or a quantised platform matmul
(vllm-ascend's W8A8 `npu.npu_quant_matmul`), whose int8 input is exchanged instead of the float
one (int8 on the wire, `_rewrite_quant_site`; `int8_comm: off` skips such sites with that reason).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import op_forms
from fxpasses import runtime_ops  # noqa: F401  (registers the odp_weight op this strategy emits)
from fxpasses import topology
from fxpasses.context import TPContext
from fxpasses.errors import ConfigError, RewriteError
from fxpasses.site_records import SitePlan
from fxpasses.rewriter import LayoutRewriter, pack_int8_scales
from fxpasses.strategies.interface import Strategy
from fxpasses.strategies.registry import register
from fxpasses.strategies.tp_family import TP_GRAPHS

aten = torch.ops.aten

# ---- the strategy ---------------------------------------------------------------------------------

class FlashComm2(Strategy):
    name = "flashcomm2"
    aliases = ("fc2",)
    family = TP_GRAPHS
    site_kinds = frozenset({"row"})
    precedence = 20

    def validate(self, config, tp, world):
        topology.check_flashcomm2_sizes(tp, config.flashcomm2_oproj_tp_size)

    def prepare_groups(self, config, ctx, create=False):
        if ctx.tp < 2 or ctx.tp_group is None:
            return None
        return topology.flashcomm2_groups(ctx, config.flashcomm2_oproj_tp_size, create)

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
        todo = []
        for p in mine:
            why = self.precheck(p, rw, ctx)
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
            qf = _quant_linear(p.site.matmul)
            dyn = qf is not None and bool(qf.token_args) and op_forms.arg(p.site.matmul, qf.token_args[0]) is not None
            extra = _rewrite_site(rw, p, groups, gather_after)
            total += extra
            wire = ""
            if qf is not None:
                wire = (" of the int8 input" + (" + its per-token scales (4 int8 columns)" if dyn else "")
                        + f" (int8 on the wire); {groups.n} int8 matmuls with the peers' weight shards, summed")
            p.done(f"all_reduce -> pad + {'reorder + ' if k > 1 else ''}all_to_all over odp{list(groups.odp.ranks)}"
                   + wire + f" + mm with o_proj columns block {groups.shard}/{k}"
                   + (f" + reduce_scatter over otp{list(groups.otp.ranks)}" if k > 1 else "")
                   + (" + all_gather over tp + unpad" if gather_after else " (Shard0 over tp)")
                   + f"; o_proj weight gathered once over odp: +{extra / 1024:.1f} KiB on this rank")
        rw.notes.append(f"flashcomm2: K={k}, n={groups.n}, extra o_proj weight memory {total / 1024:.1f} KiB per rank")
        key = "flashcomm2_extra_weight_bytes_per_rank"
        rw.extra[key] = rw.extra.get(key, 0) + total


# ---- planning checks ----------------------------------------------------------------------------

def _weight_t(mm: fx.Node) -> fx.Node | None:
    """The matmul's transposed-weight operand (mm(x, wT) / addmm(bias, x, wT)); None for a platform
    linear form, which reads the [H, D/tp] weight itself."""
    name = gf.op_name(mm)
    if name == "aten::mm":
        return mm.args[1]
    return mm.args[2] if name == "aten::addmm" else None


def _platform_linear(mm: fx.Node) -> op_forms.Matmul | None:
    """A platform matmul computing x @ weight.T (+ bias) with the [out, in] weight (vllm-ascend's
    `vllm.unquantized_gemm`), which this rewrite can replace like aten.mm / aten.addmm."""
    form = gf.platform_form(mm, op_forms.Matmul)
    return form if form is not None and form.weight_layout == "out_in" and not form.quantized \
        and not form.token_args else None


def _quant_linear(mm: fx.Node) -> op_forms.Matmul | None:
    """A platform W8A8 matmul (vllm-ascend's `npu.npu_quant_matmul`): int8 activation x1 [T, D/tp],
    int8 weight [D/tp, H] ("in_out"), a per-output-channel dequant scale, an optional per-token
    scale of the activation (dynamic W8A8)."""
    form = gf.platform_form(mm, op_forms.Matmul)
    return form if form is not None and form.quantized and form.weight_layout == "in_out" \
        and len(form.channel_args) == 1 and len(form.token_args) <= 1 else None


def _quant_precheck(plan: SitePlan, rw: LayoutRewriter, ctx: TPContext) -> str | None:
    """Checks of the quantised (int8 on the wire) form; every one is decided alike on all ranks
    (shapes, dtypes and parameters every rank has; the row bias, on TP rank 0 only, is not asked)."""
    site, mm = plan.site, plan.site.matmul
    form = _quant_linear(mm)
    if rw.config.int8_comm == "off":
        return ("int8_comm='off': FlashComm2 exchanges a quantised o_proj's int8 input (the graph quantises "
                "it before the layer); set int8_comm='auto' to allow it")
    if site.all_reduce.input is not mm:
        return "the all-reduced tensor is not the o_proj matmul output"
    x, w = op_forms.arg(mm, form.x), site.weight
    scale = op_forms.arg(mm, form.channel_args[0])
    pts = op_forms.arg(mm, form.token_args[0]) if form.token_args else None
    if form.offset and op_forms.arg(mm, form.offset) is not None:
        return f"{gf.op_name(mm)} has an output offset; FlashComm2's quantised form takes none"
    xv, wv, sv = gf.val(x), gf.val(w), gf.val(scale) if isinstance(scale, fx.Node) else None
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 2 and xv.dtype == torch.int8 and rw.is_token_major(x)):
        return "the quantised o_proj input is not an int8 [tokens, features] tensor"
    if not (gf.is_stored_value(w) and isinstance(wv, torch.Tensor) and wv.dim() == 2 and wv.dtype == torch.int8):
        return "the o_proj weight is not an int8 [D/tp, H] parameter"
    if isinstance(wv.shape[0], torch.SymInt) or not gf.same_size(xv.shape[1], wv.shape[0]):
        return "the input features do not match the weight shard"
    if not (gf.is_stored_value(scale) and isinstance(sv, torch.Tensor) and sv.dim() == 1
            and gf.same_size(sv.shape[0], wv.shape[1])):
        return "the dequant scale is not a per-output-channel [H] parameter"
    if pts is not None:
        pv = gf.val(pts)
        if not (isinstance(pv, torch.Tensor) and pv.dim() == 1 and pv.dtype == torch.float32 and rw.is_token_major(pts)):
            return "the per-token scale is not a float32 [tokens] tensor"
    out = gf.val(mm)
    if not (isinstance(out, torch.Tensor) and out.dtype.is_floating_point):
        return "the quantised o_proj does not dequantise to a float output"
    return None


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
    form = gf.platform_form(mm, op_forms.Matmul)
    if form is not None:
        why = op_forms.weight_block_refusal(form, site.weight, rw.config.weight_format)
        if why:
            return f"FlashComm2 needs a block of the o_proj weight: {why}"
    if _quant_linear(mm) is not None:
        return _quant_precheck(plan, rw, ctx)
    linear = _platform_linear(mm)
    if gf.op_name(mm) not in ("aten::mm", "aten::addmm") and linear is None:
        return (f"matmul form {gf.op_name(mm)} is not supported (aten.mm / aten.addmm with a transposed weight, or "
                "a platform linear form reading the [out, in] weight, are)")
    if ar.input is not mm:
        return "the all-reduced tensor is not the o_proj matmul output"
    if not rw.is_token_major(ar.input) or not rw.is_token_major(site.input):
        return ("the matmul's input or output does not hold its tokens on dim 0 (FlashComm2 exchanges rows of "
                "a [T, H] matrix; a [1, T, H] Transformers-backend graph gets FlashComm1 only)")
    if site.weight.op not in ("placeholder", "get_attr"):
        return "the weight is computed in the graph (not a parameter); it cannot be gathered once"
    rhs = _weight_t(mm)
    x, w, wt = gf.val(site.input), gf.val(site.weight), gf.val(rhs) if rhs is not None else None
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.dim() == 2 and w.dim() == 2):
        return "input and weight must be 2-D"
    if site.bias is not None and (gf.val(site.bias) is None or gf.val(site.bias).dim() != 1):
        return "the row bias is not a [H] vector"
    if linear is None and (wt is None or tuple(wt.shape) != (w.shape[1], w.shape[0]) or rhs is site.weight):
        return "the matmul does not use the transposed [H, D/tp] weight"
    if not gf.same_size(x.shape[1], w.shape[1]) or isinstance(w.shape[1], torch.SymInt):
        return "the input features do not match the weight shard"
    return None



# ---- the rewrite of one site ---------------------------------------------------------------------

def _rewrite_site(rw: LayoutRewriter, plan: SitePlan, groups, gather_after: bool) -> int:
    """Rewrite one site; returns the bytes of the ODP weight this rank keeps."""
    if _quant_linear(plan.site.matmul) is not None:
        return _rewrite_quant_site(rw, plan, groups, gather_after)
    g, site = rw.graph, plan.site
    mm, x, w, ar = site.matmul, site.input, site.weight, site.all_reduce
    k, n = groups.k, groups.n
    wv = gf.val(w)
    h, dl = int(wv.shape[0]), int(wv.shape[1])
    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    first = mm.prev
    with g.inserting_before(mm):
        b = rw.shard_rows()                                   # rows per TP chunk = T_pad / tp
        kb = rw.sym(operator.mul, b, k) if k > 1 else b      # rows exchanged with each ODP peer
        # pad rows are dropped later; K > 1: chunk c = j*n + i -> order (i, j)
        a2a = rw.comm.all_to_all(g, _send_rows(rw, g, x, k, n, b, kb, dl), groups.odp, kb)
        y = call(aten.view.default, a2a, [n, kb, dl])         # [n*K*b, D/tp], block p from ODP peer p
        y = call(aten.permute.default, y, [1, 0, 2])
        y = call(aten.clone.default, y, memory_format=torch.contiguous_format)
        y = call(aten.view.default, y, [kb, n * dl])          # [T_pad/n, n*D/tp]
        key = f"{site.prefix}|odp={groups.odp.c10d_name}|{','.join(map(str, groups.odp.ranks))}"
        wo = call(torch.ops.fxpasses.odp_weight.default, w, site.bias, key, groups.odp.c10d_name, n)
        gf.tag_node(wo, role="odp_weight", weight_collective="all_gather_once", group=groups.odp.label,
                    group_size=n)
        wt = call(aten.permute.default, call(aten.slice.Tensor, wo, 1, 0, n * dl), [1, 0])
        bias = call(aten.select.int, wo, 1, n * dl)
        out = call(aten.addmm.default, bias, y, wt)           # [T_pad/n, H], partial over OTP
        res = rw.comm.reduce_scatter(g, out, groups.otp) if k > 1 else out
    _finish_site(rw, first, mm, res, ar, gather_after)
    for node in (mm, _weight_t(mm)):
        if isinstance(node, fx.Node) and not node.users:
            g.erase_node(node)
    return h * (n * dl + 1) * wv.element_size()


def _finish_site(rw: LayoutRewriter, first: fx.Node, mm: fx.Node, res: fx.Node, ar: fx.Node,
                 gather_after: bool) -> None:
    """After the nodes inserted between `first` and the layer's matmul `mm`: register them as created
    (propagation leaves them alone) with the layer's module stack, mark the site's result `res`
    Shard0 and let it replace the all-reduce (gathered back to all T rows without FlashComm1)."""
    stack = mm.meta.get("nn_module_stack")
    node = first.next
    while node is not mm:
        rw.mark_created(node)
        node.meta.setdefault("fxpasses", {}).setdefault("role", "flashcomm2")
        if stack is not None:
            node.meta.setdefault("nn_module_stack", stack)
        node = node.next
    rw.mark_shard0(res, 2)
    rw.replace_all_reduce(ar, rw.gather(res) if gather_after else res)


def _send_rows(rw, g, t: fx.Node, k: int, n: int, b, kb, width: int | None) -> fx.Node:
    """pad t ([T, width] or [T]) to T_pad rows and (K > 1) reorder its tp chunks for the ODP
    all_to_all (see the module docstring)."""
    pad, _ = rw.padded_count()
    tail = [width] if width is not None else []
    tp = g.call_function(aten.constant_pad_nd.default, (t, [0, 0] * len(tail) + [0, pad], 0.0))
    if k == 1:
        return tp
    v = g.call_function(aten.view.default, (tp, [k, n, b] + tail))
    v = g.call_function(aten.permute.default, (v, [1, 0, 2] + ([3] if tail else [])))
    v = g.call_function(aten.clone.default, (v,), {"memory_format": torch.contiguous_format})
    return g.call_function(aten.view.default, (v, [rw.sym(operator.mul, kb, n)] + tail))


def _rewrite_quant_site(rw: LayoutRewriter, plan: SitePlan, groups, gather_after: bool) -> int:
    """FlashComm2 for a W8A8 o_proj: int8 on the wire.

    The graph quantises the o_proj input on each rank before the layer (static: `vllm.quantize`
    with the per-tensor scale; dynamic: `npu.npu_dynamic_quant`, one scale per token over this
    rank's D/tp features). That quantisation stays where it is, so the all_to_all sends int8
    values (and, dynamic, each chunk's per-token float32 scales, as 4 more int8 columns) instead
    of the float input: the seed's `otp_maybe_quant_comm` for static W8A8, and for dynamic W8A8 the
    original TP graph's own per-chunk scales (the seed sends bf16 there and re-quantises over D/K
    features, which differs from the TP graph by the quantisation error). Each received chunk p
    is multiplied with peer p's int8 weight shard and dequantised with peer p's scales, exactly
    as peer p's matmul does in the original graph; the n products are summed::

        q, s = <the graph's quantisation of x>                  # int8 [T, D/tp], (dynamic) s [T]
        a    = all_to_all(reorder(pad(q)), odp).view(n, K*b, D/tp)
               # dynamic: cat([q, s.view(int8)], 1) is sent instead (one all_to_all of [T, D/tp + 4]
               # int8) and split after: a = [..., :D/tp], s' = [..., D/tp:].view(float32) [n, K*b]
        W, S, B = fxpasses.odp_quant_blocks(w, scale, bias | None, ...)  # [n, D/tp, H], [n, H], [2, H]
        o    = sum_p quant_matmul(a[p], W[p], S[p], pertoken_scale=s'[p]) + B[0] (+ B[1] * s'[0])
        y    = reduce_scatter(o, otp)   if K > 1

    So the result equals the original graph's up to the order of the float additions (the
    quantisation is the same, value for value). The row bias (TP rank 0's graph only) travels in
    the one-time block gather as bias terms (`fxpasses.runtime_ops.odp_quant_blocks`)."""
    g, site = rw.graph, plan.site
    mm, ar = site.matmul, site.all_reduce
    form = _quant_linear(mm)
    k, n = groups.k, groups.n
    x, w = op_forms.arg(mm, form.x), site.weight
    scale = op_forms.arg(mm, form.channel_args[0])
    pts = op_forms.arg(mm, form.token_args[0]) if form.token_args else None
    bias = op_forms.arg(mm, form.bias) if form.bias else None
    bias = bias if isinstance(bias, fx.Node) else None
    wv, out_dtype = gf.val(w), gf.val(mm).dtype
    dl, h = int(wv.shape[0]), int(wv.shape[1])

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    first = mm.prev
    with g.inserting_before(mm):
        a, sp = _received_int8(rw, groups, x, pts, dl)
        key = f"{site.prefix}|odp={groups.odp.c10d_name}|{','.join(map(str, groups.odp.ranks))}|int8"
        blocks = call(torch.ops.fxpasses.odp_quant_blocks.default, w, scale, bias, pts is not None, out_dtype,
                      key, groups.odp.c10d_name, n)
        gf.tag_node(blocks, role="odp_weight", weight_collective="all_gather_once", group=groups.odp.label,
                    group_size=n)
        wb, sb, terms = (call(operator.getitem, blocks, i) for i in range(3))
        out = _peer_products(mm, form, (a, sp), wb, sb, n)
        biased = call(aten.add.Tensor, out, call(aten.select.int, terms, 0, 0))
        if sp is not None:
            s0 = call(aten.unsqueeze.default, call(aten.select.int, sp, 0, 0), 1)
            biased = call(aten.add.Tensor, biased, call(aten.mul.Tensor, call(aten.select.int, terms, 0, 1), s0))
        out = call(torch.ops.prims.convert_element_type.default, biased, out_dtype)
        res = rw.comm.reduce_scatter(g, out, groups.otp) if k > 1 else out
    _finish_site(rw, first, mm, res, ar, gather_after)
    if not mm.users:
        g.erase_node(mm)
    return n * (dl * h * wv.element_size() + h * gf.val(scale).element_size())


def _received_int8(rw: LayoutRewriter, groups, x: fx.Node, pts: fx.Node | None, dl: int):
    """The all_to_all of the graph's int8 o_proj input over ODP (dynamic: with its per-token float32
    scales riding as 4 more int8 columns): (a [n, K*b, D/tp], block p from ODP peer p; sp [n, K*b],
    peer p's scales, or None)."""
    g, k, n = rw.graph, groups.k, groups.n

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    b = rw.shard_rows()
    kb = rw.sym(operator.mul, b, k) if k > 1 else b
    wide = dl + 4 if pts is not None else dl
    if pts is not None:  # the float32 scale rides in the same all_to_all as 4 int8 columns
        x = pack_int8_scales(g, x, pts, lambda node, _role: node)                     # [T, D/tp + 4]
    a2a = rw.comm.all_to_all(g, _send_rows(rw, g, x, k, n, b, kb, wide), groups.odp, kb)
    a = call(aten.view.default, a2a, [n, kb, wide])             # block p from ODP peer p
    if pts is None:
        return a, None
    sp = call(aten.clone.default, call(aten.slice.Tensor, a, 2, dl, wide), memory_format=torch.contiguous_format)
    sp = call(aten.view.default, call(aten.view.dtype, sp, torch.float32), [n, kb])
    a = call(aten.clone.default, call(aten.slice.Tensor, a, 2, 0, dl), memory_format=torch.contiguous_format)
    return a, sp


def _peer_products(mm: fx.Node, form, received: tuple, wb: fx.Node, sb: fx.Node, n: int) -> fx.Node:
    """sum over ODP peers p of the o_proj's quantised matmul of chunk a[p] with peer p's int8 weight
    block W[p] and scales S[p] (and per-token scales s'[p]), as peer p's matmul in the original graph."""
    g, (a, sp) = mm.graph, received

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    out = None
    for p in range(n):
        over = {form.x: call(aten.select.int, a, 0, p), form.weight: call(aten.select.int, wb, 0, p),
                form.channel_args[0]: call(aten.select.int, sb, 0, p)}
        if form.bias:
            over[form.bias] = None
        if sp is not None:
            over[form.token_args[0]] = call(aten.select.int, sp, 0, p)
        o = op_forms.call_like(mm, g, **over)
        out = o if out is None else call(aten.add.Tensor, out, o)
    return out


STRATEGY = register(FlashComm2())
