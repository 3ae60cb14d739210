"""FlashComm1 across the pieces of vLLM's FX split: token-sharded piece boundaries, decided once per model.

In VLLM_COMPILE mode (CUDA's default, vllm-ascend's PIECEWISE) vLLM splits the Dynamo graph at its
`splitting_ops` (`vllm.compilation.backends.split_graph`) and compiles every piece for the example
values of the graph *before* the split; the post-grad pass then sees one piece at a time. A pass on
one piece cannot change what the next is compiled for, so without help every token tensor crossing a
boundary stays replicated (the residual is gathered before each piece ends and the first norm of the
next piece runs on all T rows).

The boundary contract, taken here, before the split, identically on every rank:

* a boundary value `v` (a floating tensor whose dim 0 is the model's token count T, made by a
  non-splitting piece and read only by later non-splitting pieces: the residual stream) leaves its
  piece as `fxpasses::boundary_shard(v, rank, n)`: this rank's ceil(T/n) rows of `v` padded to a
  multiple of n with zero rows, no communication;
* every later piece that reads it starts with `vllm.all_gather` of that shard, sliced to T rows.

Each piece is exact as it stands (the contract alone costs one all-gather per boundary). The
post-grad FlashComm1 rewrite of each piece then takes the gathered slice as the Shard0 value it came
from (`LayoutRewriter.adopt_boundary_gathers`) and a shard of a value it already holds sharded as
that value, so the residual stays sharded across every boundary, every norm runs on T/n rows, every
all-gather sits next to the matmul it feeds, and the model moves exactly the whole-graph FlashComm1
bytes. The fake example values of the new nodes are propagated, so vLLM compiles the later pieces for
`((T + n - 1) // n, H)` inputs; a CUDA graph captured per size sees static boundary shapes.

Decision (`boundary_decision`): FlashComm1 is enabled, the TP group has 2 ranks or more, and
FlashComm1 applies at every token count, because a piece's boundary shapes are the same in every
compile range: `min_tokens` 0 or 1, or `auto` when the analytic model (`token_gate.analytic_min_tokens`
with the platform's link costs) finds FlashComm1 no slower from 1 token to max_num_batched_tokens.
Otherwise the boundaries stay replicated and each piece decides per range as before; the reason is
logged and kept in `LAST_DECISION`.

The seam (`fxpasses.split_seam`, a vLLM adapter): vLLM has no hook before `split_graph`, so that module wraps
`vllm.compilation.backends.split_graph`, after checking that the installed vLLM calls it from
`VllmBackend.__call__` with the signature this code was written against; where it does not, the seam
is not installed and a warning says that pieces keep replicated boundaries. The minimal upstream hook
that would replace it: a `pre_split_graph_pass` in `CompilationConfig` that `VllmBackend.__call__`
runs on the Dynamo graph right before `split_graph`, with its uuid in the compile cache key.

A compiled piece loaded from vLLM's cache names `fxpasses::boundary_shard`; importing `fxpasses`
registers it (`fxpasses.runtime_ops`), and the plugin loads `fxpasses` in every vLLM process.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import link_costs, token_gate


log = logging.getLogger("fxpasses")

SHARD_OP = "fxpasses::boundary_shard"


class BoundaryError(RuntimeError):
    """The boundary contract could not be applied to a graph it was decided for."""


@torch.library.custom_op("fxpasses::boundary_shard", mutates_args=())
def boundary_shard(x: torch.Tensor, rank: int, group_size: int) -> torch.Tensor:
    """Rows [rank * R, (rank + 1) * R) of `x` padded with zero rows to n * R, R = ceil(T / n)."""
    t = x.shape[0]
    rows = (t + group_size - 1) // group_size
    pad = rows * group_size - t
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))], 0)
    return x.narrow(0, rank * rows, rows).clone()


@boundary_shard.register_fake
def _(x: torch.Tensor, rank: int, group_size: int) -> torch.Tensor:
    rows = (x.shape[0] + group_size - 1) // group_size
    return x.new_empty((rows,) + tuple(x.shape[1:]))


@dataclass(frozen=True)
class Decision:
    shard: bool
    reason: str
    boundaries: int = 0          # boundary values sharded

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "reason": self.reason, "boundaries": self.boundaries}


#: the decision of the latest split in this process (for logs, the report and tests)
LAST_DECISION: Decision | None = None


def forced_everywhere(cfg) -> bool:
    """An explicit `min_tokens` that lets the rewrite apply at every token count (0 or 1)."""
    return cfg.min_tokens != "auto" and int(cfg.min_tokens or 0) <= 1


def boundary_decision(cfg, tp: int, *, max_tokens: int | None, hidden: int | None,
                      dtype_bytes: int | None) -> Decision:
    """Whether this model's piece boundaries carry token-sharded values (see the module docstring).
    Read off the configuration and the model's shapes: every rank decides alike."""
    if "flashcomm1" not in cfg.strategies:
        return Decision(False, "FlashComm1 is not enabled")
    if tp < 2:
        return Decision(False, f"tensor parallel size {tp}: nothing to shard")
    mt = cfg.min_tokens
    if mt != "auto":
        if forced_everywhere(cfg):
            return Decision(True, f"min_tokens={mt or 0}: FlashComm1 applies at every token count")
        return Decision(False, f"min_tokens={mt}: the compile ranges below {mt} tokens keep the original "
                               "layout, and a piece's boundary shapes are the same in every range")
    if not (max_tokens and hidden and dtype_bytes):
        return Decision(False, "min_tokens=auto: the model's hidden size, dtype or max_num_batched_tokens is "
                               "unknown before the split")
    costs = link_costs.resolve(cfg.link_costs)
    n = token_gate.analytic_min_tokens("flashcomm1", max_tokens=max_tokens, tp=tp, hidden=hidden,
                                       attn_out=hidden, dtype_bytes=dtype_bytes, costs=costs)
    if n == 1:
        return Decision(True, f"min_tokens=auto: FlashComm1 is modelled no slower from 1 to {max_tokens} tokens "
                              f"on {costs.platform}")
    return Decision(False, f"min_tokens=auto: a piece's boundary shapes are the same in every compile range, "
                           f"and FlashComm1 is modelled slower at decode sizes on {costs.platform} "
                           f"({'from ' + str(n) + ' tokens only' if n else 'at every size'}); boundaries stay "
                           "replicated and each piece is decided per range")


# ---- the boundary contract on the Dynamo graph ----------------------------------------------------
def _val(n: Any):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def token_count_of(graph: fx.Graph):
    """The model's token count as vLLM reads it: the first symbolic-int input, else dim 0 of the first
    tensor input."""
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in phs:
        v = _val(ph)
        if isinstance(v, torch.SymInt):
            return v
    for ph in phs:
        v = _val(ph)
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return v.shape[0]
    return None


def _same(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea = a.node.expr if isinstance(a, torch.SymInt) else a
        eb = b.node.expr if isinstance(b, torch.SymInt) else b
        return bool(ea == eb)
    return a == b


def _piece_ids(graph: fx.Graph, is_split) -> dict[fx.Node, tuple[int, bool]]:
    """{node: (piece, is a splitting piece)} in the order `split_graph` numbers them (consecutive
    splitting ops form one piece; a getitem goes with the node it reads)."""
    out: dict[fx.Node, tuple[int, bool]] = {}
    piece, prev_split = 0, False
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0] in out:
            out[node] = out[node.args[0]]
            continue
        split = bool(is_split(node))
        if split != prev_split:
            piece += 1
        prev_split = split
        out[node] = (piece, split)
    return out


def _storage(v):
    try:
        from torch.multiprocessing.reductions import StorageWeakRef
        return StorageWeakRef(v.untyped_storage())
    except Exception:  # no storage to compare (e.g. a sparse fake): treat as its own
        return None


def _written_args(node: fx.Node) -> list:
    """The arguments `node` writes to (in-place methods and operators, ops whose schema writes an
    argument, `out=`)."""
    t = node.target
    if node.op == "call_method":
        return [node.args[0]] if isinstance(t, str) and t.endswith("_") and not t.startswith("__") else []
    if node.op != "call_function":
        return []
    if t is operator.setitem or getattr(t, "__name__", "").startswith("i") and getattr(t, "__module__", "") in (
            "_operator", "operator"):
        return [node.args[0]] if node.args else []
    written = [node.kwargs["out"]] if "out" in node.kwargs else []
    name = getattr(t, "__name__", "")
    if name.endswith("_") and not name.startswith("__") and node.args:
        written.append(node.args[0])
    schemas = []
    if isinstance(t, torch._ops.OpOverload):
        schemas = [t._schema]
    elif isinstance(t, torch._ops.OpOverloadPacket):
        schemas = [getattr(t, o)._schema for o in t.overloads()]
    for sc in schemas:
        for i, a in enumerate(sc.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                if i < len(node.args):
                    written.append(node.args[i])
                elif a.name in node.kwargs:
                    written.append(node.kwargs[a.name])
    return written


def _writes(graph: fx.Graph) -> dict:
    """{storage: [nodes writing to it in place]}."""
    out: dict = {}
    for node in graph.nodes:
        for a in _written_args(node):
            for x in (a if isinstance(a, (list, tuple)) else [a]):
                ev = _val(x)
                st = _storage(ev) if isinstance(ev, torch.Tensor) else None
                if st is not None:
                    out.setdefault(st, []).append(node)
    return out


class Boundary(NamedTuple):
    value: fx.Node                      # made by a non-splitting piece
    later: dict[int, list[fx.Node]]     # {later piece: its users of the value}
    written: bool                       # the one later piece that reads it writes to it in place


def boundary_values(graph: fx.Graph, is_split, T) -> list[Boundary]:
    """Every token-major floating value made by a non-splitting piece and read only by later
    non-splitting pieces. Each later piece reads its own
    gather of the shard taken where `v` is made, so an in-place write to `v`'s memory is allowed
    only where no other piece could see it: not in `v`'s own piece after `v`, not in a later piece
    when two later pieces read `v`, and no other value sharing `v`'s memory crosses a boundary."""
    pieces = _piece_ids(graph, is_split)
    writes = _writes(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_storage: dict = {}
    for n in graph.nodes:
        ev = _val(n)
        st = _storage(ev) if isinstance(ev, torch.Tensor) else None
        if st is not None:
            by_storage.setdefault(st, []).append(n)
    found = []
    for v in graph.nodes:
        if v not in pieces or pieces[v][1]:
            continue
        ev = _val(v)
        if not isinstance(ev, torch.Tensor) or ev.dim() < 2 or not ev.is_floating_point() \
                or not _same(ev.shape[0], T):
            continue
        st = _storage(ev)
        if st is None:
            continue
        later: dict[int, list[fx.Node]] = {}
        ok = True
        for u in v.users:
            if u.op == "output":
                ok = False  # leaves the model: the caller gets every row
                break
            pu = pieces.get(u)
            if pu is None or pu[1]:
                ok = False  # read by a splitting op (attention needs every token)
                break
            if pu[0] != pieces[v][0]:
                later.setdefault(pu[0], []).append(u)
        if not ok or not later:
            continue
        home = pieces[v][0]
        writers = [w for w in writes.get(st, []) if order[w] > order[v]]
        if any(pieces.get(w, (home,))[0] == home for w in writers):
            continue  # written after the shard is taken, in its own piece
        if writers and len(later) > 1:
            continue  # a write in one later piece that another would not see
        if any(a is not v and any(pieces.get(u, (home,))[0] != pieces.get(a, (home,))[0] for u in a.users)
               for a in by_storage.get(st, [])):
            continue  # another view of the same memory crosses a boundary
        found.append(Boundary(v, later, bool(writers)))
    return found


def shard_boundaries(graph: fx.GraphModule, is_split, tp: int, rank: int, group_name: str) -> int:
    """Apply the boundary contract to the Dynamo graph (in place); returns the number of values sharded."""
    g = graph.graph
    T = token_count_of(g)
    if T is None:
        return 0
    values = boundary_values(g, is_split, T)
    order = {n: i for i, n in enumerate(g.nodes)}  # of the original nodes (their order never changes)
    for v, later, written in values:
        ev = _val(v)
        mode = ev.fake_mode
        with g.inserting_after(v):
            tn = g.call_function(torch.ops.aten.sym_size.int, (v, 0)) if isinstance(ev.shape[0], torch.SymInt) \
                else int(ev.shape[0])
        after = tn if isinstance(tn, fx.Node) else v
        with g.inserting_after(after):
            sh = g.call_function(torch.ops.fxpasses.boundary_shard.default, (v, rank, tp))
        if isinstance(tn, fx.Node):
            tn.meta["example_value"] = ev.shape[0]
        with mode:
            sh_ev = torch.ops.fxpasses.boundary_shard.default(ev, rank, tp)
            ag_ev = torch.ops.vllm.all_gather.default(sh_ev, 0, tp, group_name)
        sh.meta["example_value"] = sh_ev
        for _, users in sorted(later.items()):
            first = min(users, key=order.__getitem__)
            with g.inserting_before(first):
                ag = g.call_function(torch.ops.vllm.all_gather.default, (sh, 0, tp, group_name))
                full = g.call_function(torch.ops.aten.slice.Tensor, (ag, 0, 0, tn))
                if written:  # written in place there: its own rows, not a view of the buffer
                    ag.meta["example_value"], full.meta["example_value"] = ag_ev, ev
                    full = g.call_function(torch.ops.aten.clone.default, (full,))
            ag.meta["example_value"] = ag_ev
            full.meta["example_value"] = ev
            for u in users:
                u.replace_input_with(v, full)
    if values:
        graph.recompile()
    return len(values)


def model_facts(graph: fx.GraphModule, T) -> tuple[int | None, int | None]:
    """(hidden, dtype bytes) of the residual stream: the widest floating [T, H] activation."""
    best = None
    for n in graph.graph.nodes:
        ev = _val(n)
        if isinstance(ev, torch.Tensor) and ev.dim() == 2 and ev.is_floating_point() and _same(ev.shape[0], T) \
                and isinstance(ev.shape[1], int):
            if best is None or ev.shape[1] > best[0]:
                best = (int(ev.shape[1]), ev.element_size())
    return best or (None, None)


def carries_contract(graph: fx.Graph) -> bool:
    """Does this (post-grad) piece hand a sharded boundary value over, or gather one it received?"""
    for n in graph.nodes:
        if gf.op_name(n) == SHARD_OP:
            return True
        if gf.collective_kind(n) == "all_gather":
            x = gf.collective_input(n)
            if isinstance(x, fx.Node) and x.op == "placeholder":
                return True
    return False
