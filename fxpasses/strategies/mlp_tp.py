"""MLP-TP: dense MLP tensor parallel for DP-attention deployments (vllm-ascend's `MLPColumnParallelOp`
+ `MLPRowParallelOp`).

The original graph on every rank is the TP=1 graph (own B tokens, full weights). K = `mlp_tp_size`
(0 = world size); the MLP-TP group is K consecutive ranks (`fxpasses.dp_groups`); s = this rank's
index in it; I = intermediate size, h = 2 halves (gate, up) for gated MLPs or 1 for plain ones.

Before (TP=1)::

    gu = mm(x, Wgu.T) (+ bgu)                      # x [B, H], Wgu [h*I, H] -> [B, h*I]
    a  = act(gu)                                   # e.g. SiluAndMul: silu(gu[:, :I]) * gu[:, I:]
    y  = mm(a, Wd.T) (+ bd)                        # Wd [H, I] -> [B, H]

After::

    g  = all_gather(x, mlp)                        # [K*B, H]: every group rank's tokens, rank-major
    W  = cat(Wgu[j*I + s*I/K : j*I + (s+1)*I/K] for j < h)    # gate rows and up rows sliced separately
    gu = mm(g, W.T) (+ the same slices of bgu)     # [K*B, h*I/K]
    a  = act(gu)                                   # the graph's own activation nodes, with their
                                                   #   feature constants I -> I/K, tokens B -> K*B
    o  = mm(a, Wd[:, s*I/K:(s+1)*I/K].T) (+ bd on group rank 0 only)   # [K*B, H], partial
    y  = reduce_scatter(o, mlp)                    # [B, H]: this rank's own tokens

Bias as vLLM's TP layers: the column bias is sharded like the rows, the row bias added once (rank 0).
Only dense gate_up_proj/down_proj pairs of one MLP module: routed experts (FusedMoE) are no linear
sites and `experts.` is excluded by the pattern set. The activation between the two matmuls must be
made of ops whose feature dimension can be re-sliced (pointwise ops, slices/splits of the last dim,
views, vLLM's `*_and_mul` ops); anything else leaves the pair untouched with the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxpasses import dp_groups
from fxpasses import graph_forms as gf
from fxpasses.context import TPContext
from fxpasses.plan import SitePlan
from fxpasses.rewriter import LayoutRewriter
from fxpasses.strategies import dp_common as dc
from fxpasses.tokenwise import COPY_LIKE

NAME = "mlp_tp"
aten = torch.ops.aten

_ALLOC = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::full", "aten::ones"}
_VIEWS = {"aten::view", "aten::reshape", "aten::_unsafe_view"}
_AND_MUL = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "mul_and_silu", "fatrelu_and_mul",
            "swigluoai_and_mul", "gelu_new", "gelu_fast", "gelu_quick", "relu2")


def _parent(prefix: str) -> str:
    return prefix.rsplit(".", 1)[0] if "." in prefix else ""


def _is_pointwise(node: fx.Node) -> bool:
    t = node.target
    return (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags) or gf.op_name(node) in COPY_LIKE


class _Region:
    """The activation nodes between the gate_up matmul and the down_proj input, plus the edits that
    re-slice their feature constants (computed up front, applied only when the whole pair is OK)."""

    def __init__(self, gu: fx.Node, dn: fx.Node, dn_in: fx.Node):
        self.gu, self.dn, self.dn_in = gu, dn, dn_in
        down = set()
        stack = [gu]
        while stack:
            n = stack.pop()
            for u in n.users:
                if u is not dn and u not in down:
                    down.add(u)
                    stack.append(u)
        up = set()
        stack = [dn_in]
        while stack:
            n = stack.pop()
            if n in up or n is gu:
                continue
            up.add(n)
            stack.extend(n.all_input_nodes)
        self.nodes = down & up
        self.edits: list = []   # (node, arg position or kwarg name, new value)


def _analyse(region: _Region, rw: LayoutRewriter, M: int, h: int, k: int, kT) -> str | None:
    """Fill region.edits or return the reason the activation cannot be re-sliced."""
    gu, dn, nodes = region.gu, region.dn, region.nodes
    if region.dn_in is not gu and region.dn_in not in nodes:
        return "down_proj's input does not depend on gate_up_proj's output"
    inside = nodes | {gu}
    for n in inside:
        for u in n.users:
            if u not in nodes and u is not dn:
                return f"{n.name} between gate_up_proj and down_proj is also used by {u.name}"
    N = h * M
    ml = M // k

    def map_col(c):
        if isinstance(c, int) and c >= N:
            return c          # "to the end"
        if isinstance(c, int) and c >= 0 and c % M == 0:
            return (c // M) * ml
        return None

    def is_T(e) -> bool:
        return (isinstance(e, fx.Node) and gf.same_size(gf.val(e), rw.T)) or \
            (isinstance(e, int) and isinstance(rw.T, int) and e == rw.T)

    def map_shape(shape, what):
        if not isinstance(shape, (list, tuple)) or len(shape) != 2:
            return None, f"{what} has shape {shape}; only [tokens, features] is supported"
        t, f = shape
        if not (is_T(t) or t == -1):
            return None, f"{what}: dim 0 {t} is not the token count"
        if f == -1:
            return [kT if t != -1 else -1, -1], None
        if not (isinstance(f, int) and 0 < f <= N and f % M == 0):
            return None, f"{what}: feature size {f} cannot be re-sliced"
        return [kT if t != -1 else -1, f // M * ml], None

    order = {n: i for i, n in enumerate(gu.graph.nodes)}
    for n in sorted(nodes, key=order.__getitem__):
        name = gf.op_name(n)
        v = gf.val(n)
        nd = v.dim() if isinstance(v, torch.Tensor) else None
        if gf.is_getitem(n):
            continue
        if gf.is_auto_functionalized(n) or name.startswith("_C::") or name.startswith("vllm"):
            if not name.split("::")[-1].endswith(_AND_MUL):
                return f"op {name} between gate_up_proj and down_proj is not a known activation"
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                an = gf.op_name(a)
                if an not in _ALLOC:
                    return f"activation {name} reads {a.name} ({an}) from outside the MLP"
                if any(u not in nodes for u in a.users):
                    return f"buffer {a.name} of {name} is shared with other ops"
                shp, why = map_shape(a.args[0], f"buffer {a.name}")
                if why:
                    return why
                region.edits.append((a, 0, shp))
            continue
        if name in ("aten::slice",):
            dim = n.args[1] if len(n.args) > 1 else 0
            if nd is None or dim % nd != nd - 1:
                return f"{n.name} slices dim {dim}, not the feature dim"
            for pos, default in ((2, None), (3, None)):
                c = n.args[pos] if len(n.args) > pos else default
                if c is None:
                    continue
                c2 = map_col(c)
                if c2 is None:
                    return f"{n.name} slices the feature dim at {c}, not at a gate/up boundary"
                region.edits.append((n, pos, c2))
            if len(n.args) > 4 and n.args[4] != 1:
                return f"{n.name} is a strided slice"
            continue
        if name in ("aten::split_with_sizes", "aten::split"):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            src = gf.val(n.args[0])
            if src is None or dim % src.dim() != src.dim() - 1:
                return f"{n.name} splits dim {dim}, not the feature dim"
            sz = n.args[1]
            if isinstance(sz, (list, tuple)):
                if not all(isinstance(z, int) and z % M == 0 for z in sz):
                    return f"{n.name} splits the features as {sz}, not at gate/up boundaries"
                region.edits.append((n, 1, [z // M * ml for z in sz]))
            else:
                if not (isinstance(sz, int) and sz % M == 0):
                    return f"{n.name} splits the features by {sz}"
                region.edits.append((n, 1, sz // M * ml))
            continue
        if name == "aten::chunk":
            dim = n.args[2] if len(n.args) > 2 else 0
            src = gf.val(n.args[0])
            if src is None or dim % src.dim() != src.dim() - 1:
                return f"{n.name} chunks dim {dim}, not the feature dim"
            continue
        if name in _VIEWS:
            shp, why = map_shape(n.args[1], n.name)
            if why:
                return why
            region.edits.append((n, 1, shp))
            continue
        if _is_pointwise(n):
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                av = gf.val(a)
                if isinstance(av, torch.Tensor) and av.numel() != 1:
                    return f"{n.name} ({name}) mixes in tensor {a.name} from outside the MLP"
            continue
        return f"op {name} ({n.name}) between gate_up_proj and down_proj cannot be re-sliced"
    return None


def _pairs(plans: list[SitePlan]):
    """(gate_up plan, down plan) per MLP module; plans without a partner are marked skipped."""
    mine = [p for p in plans if p.strategy == NAME and p.status == "planned"]
    cols = {_parent(p.site.prefix): p for p in mine if p.site.kind == "column"}
    rows = {_parent(p.site.prefix): p for p in mine if p.site.kind == "row"}
    out = []
    for parent, c in cols.items():
        r = rows.get(parent)
        if r is None:
            c.status, c.reason = "skipped", f"no down_proj in {parent!r} is owned by mlp_tp; MLP-TP rewrites pairs"
        else:
            out.append((c, r))
    for parent, r in rows.items():
        if parent not in cols:
            r.status, r.reason = "skipped", f"no gate_up_proj in {parent!r} is owned by mlp_tp; MLP-TP rewrites pairs"
    return out


def precheck(cp: SitePlan, rp: SitePlan, rw: LayoutRewriter, ctx: TPContext, k: int, kT):
    """(reason, (M, h, region)) for a gate_up/down pair."""
    cs, rs = cp.site, rp.site
    for s in (cs, rs):
        why = dc.dp_precheck(s, ctx)
        if why:
            return f"{s.prefix}: {why}", None
        if not dc.matmul_rhs_is_weight_t(s):
            return f"{s.prefix}: the matmul does not read the weight as weight.T", None
    xv = gf.val(cs.input)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not rw.is_token(cs.input):
        return "the gate_up_proj input is not a [tokens, features] tensor", None
    wg, wd = dc.weight_val(cs), dc.weight_val(rs)
    if wg is None or wd is None:
        return "weights are not 2-D", None
    N, M = wg.shape[0], wd.shape[1]
    if not (isinstance(N, int) and isinstance(M, int)) or N % M or N // M not in (1, 2):
        return f"gate_up_proj has {N} output features and down_proj {M} input features: not a (gated) MLP", None
    if M % k:
        return f"intermediate size {M} is not divisible by mlp_tp_size={k}", None
    region = _Region(cs.matmul, rs.matmul, rs.input)
    why = _analyse(region, rw, M, N // M, k, kT)
    if why:
        return why, None
    return None, (M, N // M, region)


def rewrite(rw: LayoutRewriter, plans: list[SitePlan], ctx: TPContext) -> None:
    pairs = _pairs(plans)
    if not pairs:
        return
    grp = dp_groups.ensure_dp_groups(ctx, rw.config)["mlp_tp"]
    k, s, g = grp.k, grp.rank, rw.graph
    checked = rw.__dict__.setdefault("_dp_checked_groups", set())
    T = rw.token_count_node()
    kT = rw.__dict__.get("_mlp_kT")
    if kT is None:
        # K*T, defined right after T so every re-shaped buffer of the activation can use it
        anchor = T if isinstance(T, fx.Node) else None
        if anchor is None:
            kT = T * k
        else:
            where = anchor.next
            while where.op == "placeholder":
                where = where.next
            with g.inserting_before(where):
                kT = dc.tag(dc.mul_node(g, T, k), "tokens_times_k", NAME)
        rw._mlp_kT = kT
    done_sites = []
    for cp, rp in pairs:
        why, info = precheck(cp, rp, rw, ctx, k, kT)
        if why:
            for p in (cp, rp):
                p.status, p.reason = "skipped", why
            continue
        M, h, region = info
        ml = M // k
        cs, rs = cp.site, rp.site
        gu, dn = cs.matmul, rs.matmul
        with g.inserting_before(gu):
            xin = dc.maybe_check_tokens(g, cs.input, grp.ref, rw.config, checked, f"MLP TP at {cs.prefix}", NAME)
            gathered = rw.comm.all_gather(g, xin, grp.ref)
            parts = [dc.tag(g.call_function(aten.slice.Tensor, (cs.weight, 0, j * M + s * ml, j * M + (s + 1) * ml)),
                            "weight_slice", NAME) for j in range(h)]
            w = parts[0] if h == 1 else dc.tag(g.call_function(aten.cat.default, (parts, 0)), "weight_slice", NAME)
            b = None
            if cs.bias is not None:
                bp = [dc.tag(g.call_function(aten.slice.Tensor, (cs.bias, 0, j * M + s * ml, j * M + (s + 1) * ml)),
                             "bias_slice", NAME) for j in range(h)]
                b = bp[0] if h == 1 else dc.tag(g.call_function(aten.cat.default, (bp, 0)), "bias_slice", NAME)
            new_gu = dc.emit_matmul(g, gathered, w, b, NAME)
        gu.replace_all_uses_with(new_gu)
        g.erase_node(gu)
        for node, pos, value in region.edits:
            args = list(node.args)
            args[pos] = value
            node.args = tuple(args)
        with g.inserting_before(dn):
            wd = dc.tag(g.call_function(aten.slice.Tensor, (rs.weight, 1, s * ml, (s + 1) * ml)), "weight_slice", NAME)
            o = dc.emit_matmul(g, rs.input, wd, rs.bias if s == 0 else None, NAME)
            y = rw.comm.reduce_scatter(g, o, grp.ref)
        dn.replace_all_uses_with(y)
        g.erase_node(dn)
        group = list(grp.ref.ranks)
        cp.status, cp.reason = "rewritten", (f"all_gather over MLP-TP group {group} + gate/up rows "
                                             f"[{s * ml}, {(s + 1) * ml}) of each of {h} half(s)")
        rp.status, rp.reason = "rewritten", (f"columns [{s * ml}, {(s + 1) * ml}) + reduce_scatter over {group}"
                                             + (" (bias on group rank 0)" if rs.bias is not None else ""))
        done_sites += [(cs.prefix, dc.nbytes(dc.weight_val(cs))), (rs.prefix, dc.nbytes(dc.weight_val(rs)))]
    if done_sites:
        note, extra = dc.resident_note(NAME, k, done_sites)
        rw.__dict__.setdefault("notes", []).append(note)
        rw.__dict__.setdefault("extra", {})[NAME] = {**extra, "group": list(grp.ref.ranks),
                                                     "equal_token_counts_required": True}
