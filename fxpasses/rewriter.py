"""The layout rewriter: materialise layout changes as explicit nodes and propagate Shard0.

Strategies call `to_shard0_from_partial` (pad + reduce_scatter), `replace_all_reduce`, `gather`
(all_gather + unpad, once per value), `local_shard` (pad + this rank's slice, no communication),
`mark_shard0` (a value a strategy built is Shard0), `mark_rank_local` (see below), `sym` (symbolic size arithmetic as graph values), `padded_count` / `shard_rows` /
`token_count_node`, and keep per-strategy state in `state(name)`; then `propagate()` walks the
graph once: a node with a Shard0 input runs sharded when the
token-wise table allows it (its other token-aligned inputs are sliced locally), otherwise it gets
Replicate inputs (gathered once per value). Graph outputs always get Replicate.

The token dimension. A value's token dim is the first dim of size T with only size-1 dims before
it (`tokenwise.token_dim_of`): 0 in vLLM's native [T, H] graphs, 1 in its Transformers backend's
[1, T, H] graphs. "Shard0" is sharded along that dim (the same rows in memory): padding and the
local slice act on it, and a collective runs on the value with its leading size-1 dims squeezed
(collectives split dim 0), which are restored after it. The rewriter records the token dim of
every value it lays out (`token_dim`), so the verifier reads the rows where they are.

Rank-local values. The output of a matmul against a weight sharded over the group (a column
layer's feature shard, a row layer's or the vocab embedding's partial sum, a fused MoE's partial
sum) differs across ranks in more than its rows: it must never be sliced into Shard0 rows, and
every node that consumes it must run on all tokens. `mark_rank_local` seeds such values (the
pipeline marks every TP-sharded site's matmul, whether a strategy rewrites it or not); propagation
carries the mark to every consumer until the graph's own all-reduce over the group, and gives each
marked node Replicate inputs. A marked node therefore computes exactly what it computes in the
original graph (all its inputs are the original values), whatever it is.

Where to gather. A Shard0 value consumed by a Replicate-demanding node is all-gathered once. A
token-wise node whose every consumer demands Replicate may instead run on all tokens after its
inputs are gathered (an MoE router reading the hidden state its experts gather, a norm whose
float32 steps are wider than its bf16 input and output); which of them do is decided once, before
the walk, as the minimum cut of gathered bytes per token over the graph's fake values
(`fxpasses.gather_points`, called by `_replicate_early`). A linear layer's input quantisation (int8
values, plus per-token scales for a dynamic scheme) is therefore run on the shards and its int8
output gathered (a token-wise quantisation commutes with a gather over tokens, bit for bit):
half the bytes of a bf16 input. A dynamic quantisation's int8 values and float32 per-token scales
are gathered in one all_gather (the scales as 4 more int8 columns, `pack_int8_scales`; MLP-TP's
all_gather of a quantised gate_up_proj input uses the same packing). With `int8_comm: off` the
quantisation runs after the gather instead, on the gathered float input. Padding is symbolic and
computed once per graph, right after the inputs, from the graph's own token count:
rows = ceil(T / n) = (T + n - 1) // n, T_pad = rows * n, pad = T_pad - T. (The ceil-div form keeps
the shape expressions small, which keeps FakeTensor propagation of the sharded stream cheap.)
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxpasses import gather_points
from fxpasses import graph_forms as gf
from fxpasses import layouts
from fxpasses.comm import CommBackend
from fxpasses.context import GroupRef
from fxpasses.errors import RewriteError
from fxpasses.piece_boundaries import SHARD_OP
from fxpasses.tokenwise import is_quantize, shape_arg_fix, token_aligned_args, token_dim_of

aten = torch.ops.aten


#: ops that change a tensor's dim 0 only (its rows keep their width and dtype)
_ROWS_ONLY = frozenset({"_c10d_functional::wait_tensor", "_c10d_functional::reduce_scatter_tensor",
                        "_c10d_functional::all_gather_into_tensor", "vllm::reduce_scatter", "vllm::all_gather",
                        "aten::constant_pad_nd", "aten::slice", "aten::narrow", "aten::squeeze",
                        "aten::unsqueeze"})


def _tensor_valued(node: fx.Node) -> bool:
    v = gf.val(node)
    return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and
                                           any(isinstance(x, torch.Tensor) for x in v))


class LayoutRewriter:
    def __init__(self, graph: fx.Graph, group: GroupRef, rank_in_group: int, comm: CommBackend,
                 token_count, config):
        self.graph, self.group, self.rank, self.comm = graph, group, rank_in_group, comm
        self.config = config                  # the pass's FxPassesConfig (strategy sizes, strict, ...)
        self.n = group.size
        self.T = token_count                 # int or SymInt of the original graph
        self._T_node: fx.Node | int | None = None
        self.layout: dict[fx.Node, object] = {}
        self._gathered: dict[fx.Node, fx.Node] = {}
        self._local: dict[fx.Node, fx.Node] = {}
        self.created: dict[fx.Node, None] = {}  # ordered set of the nodes the rewrite inserted
        self._padding = None                  # (rows, T_pad, pad), built once by padded_count()
        self._ndim: dict[fx.Node, int] = {}   # rank of the tensors we create (they have no fake value yet)
        self._tdim: dict[fx.Node, int] = {}   # token dim of every value we lay out (see token_dim)
        self._stream_dims: set[int] = set()   # token dims of the values reduce-scattered into Shard0
        self.touched: set[fx.Node] = set()    # original nodes whose inputs/args a rewrite changed
        self.notes: list[str] = []            # strategy remarks copied into the PassReport
        self.extra: dict = {}                 # strategy numbers copied into PassReport.extra
        self._state: dict[str, dict] = {}     # per-strategy scratch space (state())
        self.rank_local: set[fx.Node] = set()  # values that differ across the group beyond their rows
        self.early: set[fx.Node] = set()      # token-wise nodes run on all tokens after a gather upstream
        self.boundary_out: set[fx.Node] = set()  # Shard0 values that leave the graph sharded (piece boundary)

    def state(self, strategy: str) -> dict:
        """A dict private to one strategy for the length of this rewrite (e.g. values it built once)."""
        return self._state.setdefault(strategy, {})

    # ---- token count -------------------------------------------------------------------------
    def token_dim(self, n) -> int | None:
        """`n`'s token dim: recorded for the values the rewrite laid out, else read off its fake
        value (`token_dim_of`); None when it has none."""
        if n in self._tdim:
            return self._tdim[n]
        td = token_dim_of(gf.val(n), self.T)
        if td is None and n in self.layout:  # created by us without a record: token-major
            return 0
        return td

    def is_token(self, n) -> bool:
        return self.token_dim(n) is not None

    def is_token_major(self, n) -> bool:
        """The token dim is dim 0 (the layouts that exchange rows of a [T, H] matrix need it)."""
        return self.token_dim(n) == 0

    def _lay(self, node: fx.Node, layout, td: int | None, ndim: int | None = None) -> None:
        self.layout[node] = layout
        self._tdim[node] = 0 if td is None else td
        if ndim is not None:
            self._ndim[node] = ndim

    def token_layout(self) -> dict:
        """The token dimension, the token count and the rows each rank holds of a Shard0 value."""
        dims = sorted(self._stream_dims) or [0]  # where the reduce-scattered token stream holds its tokens
        return {"token_dim": dims[0] if len(dims) == 1 else dims, "token_count": str(self.T),
                "group_size": self.n, "rows_per_rank": str((self.T + self.n - 1) // self.n)}

    def token_dim_note(self, n: fx.Node | None = None) -> str:
        """Where the token count sits in `n`'s shape, for skip reasons."""
        v = gf.val(n) if n is not None else None
        if not isinstance(v, torch.Tensor):
            return f"token count {self.T}"
        dims = [i for i, s in enumerate(v.shape) if gf.same_size(s, self.T)]
        where = f"dim {dims[0]}" if dims else "no dim"
        return (f"token count {self.T} is {where} of shape {list(v.shape)}; a token dim must be the first "
                "dim of size T with only size-1 dims before it")

    def ndim(self, n) -> int | None:
        if n in self._ndim:
            return self._ndim[n]
        v = gf.val(n)
        return v.dim() if isinstance(v, torch.Tensor) else None

    def token_count_node(self):
        """A graph value holding T (an int when static), defined right after the placeholders."""
        if self._T_node is not None:
            return self._T_node
        if not isinstance(self.T, torch.SymInt):
            self._T_node = int(self.T)
            return self._T_node
        phs = [n for n in self.graph.nodes if n.op == "placeholder"]
        for ph in phs:
            v = gf.val(ph)
            if isinstance(v, torch.SymInt) and gf.same_size(v, self.T):
                self._T_node = ph
                return ph
        src = next((ph for ph in phs if self.is_token(ph)), None)
        if src is None:
            raise RewriteError("cannot recover the token count from the graph inputs (no input has a "
                               "token dim); the graph cannot be padded symbolically")
        with self.graph.inserting_before(phs[-1].next):
            self._T_node = self._new(self.graph.call_function(aten.sym_size.int, (src, self.token_dim(src))),
                                     "token_count")
        return self._T_node

    def _new(self, node: fx.Node, role: str) -> fx.Node:
        self.mark_created(node)
        return gf.tag_node(node, role=role)

    def mark_created(self, node: fx.Node) -> None:
        """Register a node a strategy inserted itself (propagation then leaves it alone)."""
        self.created[node] = None

    def sym(self, fn, *args, role="sym"):
        """fn(*args) as a graph value when an argument is one (symbolic sizes), else the plain result."""
        if not any(isinstance(a, fx.Node) for a in args):
            return fn(*args)
        return self._new(self.graph.call_function(fn, args), role)

    def _padding_values(self):
        """(rows, T_pad, pad) as graph values (ints when T is static), inserted once, after the
        inputs (and after the token-count node when the rewrite had to create one)."""
        if self._padding is not None:
            return self._padding
        t = self.token_count_node()
        if not isinstance(t, fx.Node):  # static token count: plain ints
            rows = (t + self.n - 1) // self.n
            self._padding = (rows, rows * self.n, rows * self.n - t)
            return self._padding
        anchor = t  # right after T (after the run of inputs it belongs to, if it is an input)
        while anchor.op == "placeholder" and anchor.next.op == "placeholder":
            anchor = anchor.next
        with self.graph.inserting_before(anchor.next):  # keeps insertion order: rows, T_pad, pad
            rows = self.sym(operator.floordiv, self.sym(operator.add, t, self.n - 1), self.n)
            tpad = self.sym(operator.mul, rows, self.n)
            pad = self.sym(operator.sub, tpad, t)
        self._padding = (rows, tpad, pad)
        return self._padding

    def padded_count(self):
        """(pad, T_pad): the rows to append so the token count divides by the group size."""
        _, tpad, pad = self._padding_values()
        return pad, tpad

    def shard_rows(self):
        """Rows of a Shard0 value: ceil(T / n)."""
        return self._padding_values()[0]

    def mark_shard0(self, node: fx.Node, ndim: int, token_dim: int = 0) -> None:
        """Declare a value a strategy built as Shard0 over the rewriter's group, of rank `ndim`."""
        self._lay(node, layouts.SHARD0, token_dim, ndim)

    def mark_rank_local(self, node: fx.Node) -> None:
        """`node`'s value depends on a weight sharded over the group (see the module docstring)."""
        self.rank_local.add(node)

    # ---- primitive layout changes (insert right after `value`) --------------------------------
    def _anchor(self, value: fx.Node) -> fx.Node:
        """The node after which work on `value` that needs the padding values goes: after `value`, the
        padding values and the run of inputs (in a piecewise graph a token value may be an input that
        comes before the token count the padding is computed from)."""
        self._padding_values()
        cands = [value] + [v for v in self._padding or () if isinstance(v, fx.Node)]
        if value.op == "placeholder":
            cands.append(next(n for n in reversed(self.graph.nodes) if n.op == "placeholder"))
        return max(cands)

    def _pad(self, x: fx.Node) -> fx.Node:
        """`x` padded with zero rows to T_pad along its token dim."""
        pad, _ = self.padded_count()
        nd, td = self.ndim(x), self.token_dim(x) or 0
        return self._new(self.graph.call_function(aten.constant_pad_nd.default,
                                                  (x, [0, 0] * (nd - 1 - td) + [0, pad], 0.0)), "pad")

    def _squeeze_leading(self, x: fx.Node, td: int) -> fx.Node:
        """`x` without the `td` size-1 dims before its token dim (a collective splits dim 0)."""
        if not td:
            return x
        return self._new(self.graph.call_function(aten.squeeze.dims, (x, list(range(td)))), "token_dim_squeeze")

    def _unsqueeze_leading(self, x: fx.Node, td: int) -> fx.Node:
        """The inverse of `_squeeze_leading`: `td` size-1 dims put back in front."""
        for _ in range(td):
            x = self._new(self.graph.call_function(aten.unsqueeze.default, (x, 0)), "token_dim_unsqueeze")
        return x

    def to_shard0_from_partial(self, partial: fx.Node) -> fx.Node:
        """Partial -> Shard0: pad + reduce_scatter (along the token dim)."""
        td = self.token_dim(partial) or 0
        with self.graph.inserting_before(self._anchor(partial).next):
            padded = self._pad(partial)
            flat = self._squeeze_leading(padded, td)
        with self.graph.inserting_before(flat.next):
            rs = self.comm.reduce_scatter(self.graph, flat, self.group)
        self._record_collective(flat, rs)
        with self.graph.inserting_before(rs.next):
            out = self._unsqueeze_leading(rs, td)
        self._lay(out, layouts.SHARD0, td, self.ndim(partial))
        self._stream_dims.add(td)
        return out

    def replace_all_reduce(self, ar: gf.AllReduce, new: fx.Node) -> None:
        """Route every user of a TP all-reduce to `new`, then erase the all-reduce's nodes."""
        self.touched.update(ar.result.users)
        ar.result.replace_all_uses_with(new)
        for n in reversed(ar.nodes):
            if not n.users:
                self.graph.erase_node(n)

    def _record_collective(self, first: fx.Node, last: fx.Node) -> None:
        n = first.next
        while True:
            self.mark_created(n)
            if n is last:
                break
            n = n.next

    def gather(self, value: fx.Node) -> fx.Node:
        """Shard0 -> Replicate: all_gather + unpad (slice to T rows). Once per value."""
        if value in self._gathered:
            return self._gathered[value]
        pair = self._quant_pair(value)
        if pair is not None:
            self._gather_packed(*pair)
            return self._gathered[value]
        t = self.token_count_node()
        td = self.token_dim(value) or 0
        with self.graph.inserting_before(max(value, t).next if isinstance(t, fx.Node) else value.next):
            flat = self._squeeze_leading(value, td)
            ag = self.comm.all_gather(self.graph, flat, self.group)
        self._record_collective(value, ag)
        with self.graph.inserting_before(ag.next):
            out = self._new(self.graph.call_function(aten.slice.Tensor, (ag, 0, 0, t)), "unpad")
            out = self._unsqueeze_leading(out, td)
        self._lay(out, layouts.REPLICATE, td, self.ndim(value))
        self._gathered[value] = out
        return out

    def _quant_pair(self, value: fx.Node):
        """(values, scales) when `value` is an output of a dynamic quantisation whose int8 values
        [R, w] and float32 per-token scales [R] / [R, 1] are both Shard0: gathered together."""
        if not gf.is_getitem(value) or not is_quantize(value.args[0]):
            return None
        # a fused norm + quantisation also outputs the float residual sum: the pair is the int8 output
        # and the float32 per-row one, whatever their positions
        outs = [u for u in value.args[0].users if gf.is_getitem(u) and self.layout.get(u) is layouts.SHARD0]
        pairs = [(q, sc) for q in outs for sc in outs if q is not sc and packable(q, sc)]
        if len(pairs) != 1 or value not in pairs[0]:
            return None
        return pairs[0]

    def _gather_packed(self, q: fx.Node, sc: fx.Node) -> None:
        """int8 values [R, w] and their float32 scales, one all_gather (`pack_int8_scales`): split
        off and viewed back as float32 after the unpad."""
        g, t = self.graph, self.token_count_node()
        anchor = max(q, sc)
        with g.inserting_before(max(anchor, t).next if isinstance(t, fx.Node) else anchor.next):
            packed = pack_int8_scales(g, q, sc, self._new)
        with g.inserting_before(packed.next):
            ag = self.comm.all_gather(g, packed, self.group)
        self._record_collective(packed, ag)
        with g.inserting_before(ag.next):
            out = self._new(g.call_function(aten.slice.Tensor, (ag, 0, 0, t)), "unpad")
            qg, sg = unpack_int8_scales(g, out, int(gf.val(q).shape[1]), gf.val(sc).dim(), self._new)
        for src, dst in ((q, qg), (sc, sg)):
            self._lay(dst, layouts.REPLICATE, 0, gf.val(src).dim())
            self._gathered[src] = dst

    def local_shard(self, value: fx.Node) -> fx.Node:
        """Replicate -> Shard0 without communication: pad + this rank's chunk. Once per value."""
        if value in self._local:
            return self._local[value]
        td = self.token_dim(value) or 0
        with self.graph.inserting_before(self._anchor(value).next):
            padded = self._pad(value)
        with self.graph.inserting_before(padded.next):
            chunk = self.shard_rows()
            start = self.sym(operator.mul, chunk, self.rank)
            out = self._new(self.graph.call_function(aten.narrow.default, (padded, td, start, chunk)),
                            "local_shard")
        self._lay(out, layouts.SHARD0, td, self.ndim(value))
        self._local[value] = out
        return out

    # ---- piece boundaries (fxpasses.piece_boundaries) -------------------------------------------
    def adopt_boundary_gathers(self) -> int:
        """A piece whose token-sharded input arrives as `all_gather(x)[:T]` over this group, x with
        ceil(T/n) rows (the boundary contract of `fxpasses.piece_boundaries`): x is that value's Shard0
        form, so the slice's users read x and propagation gathers it where a consumer demands all rows.
        Returns how many gathers were taken."""
        if self.n < 2:
            return 0
        rows = (self.T + self.n - 1) // self.n
        taken = 0
        for node in list(self.graph.nodes):
            head = gf.all_gather_rows(node) if node not in self.created else None
            if head is None:
                continue
            result, group, size = head
            if size != self.n or group not in (self.group.c10d_name, self.group.vllm_name):
                continue
            x = gf.collective_input(node)
            xv = gf.val(x)
            if not isinstance(xv, torch.Tensor) or xv.dim() < 1 or not gf.same_size(xv.shape[0], rows):
                continue
            if len(result.users) != 1:
                continue  # the gathered buffer is also read (or written back into) whole
            s = next(iter(result.users))
            end = s.args[3] if len(s.args) > 3 else None
            if not (gf.is_unpad(s, result) and end is not None
                    and gf.same_size(gf.val(end) if isinstance(end, fx.Node) else end, self.T)):
                continue
            value = s  # the seam copies the rows where a later piece writes to them in place
            if len(s.users) == 1 and gf.op_name(next(iter(s.users))) == "aten::clone":
                value = next(iter(s.users))
            self.touched.update(value.users)
            value.replace_all_uses_with(x)
            for dead in dict.fromkeys((value, s, result, node)):  # a wait is impure: erased by hand
                if not dead.users:
                    self.graph.erase_node(dead)
            self._lay(x, layouts.SHARD0, 0, xv.dim())
            self._stream_dims.add(0)
            taken += 1
        return taken

    def _boundary_shard_of_shard0(self, node: fx.Node) -> bool:
        """`fxpasses::boundary_shard(v)` of a Shard0 `v` that only leaves the graph: the same rows."""
        return (gf.op_name(node) == SHARD_OP and self.layout.get(node.args[0]) is layouts.SHARD0
                and self.token_dim(node.args[0]) == 0 and node.args[2] == self.n
                and all(u.op == "output" for u in node.users))

    # ---- propagation -------------------------------------------------------------------------
    def _original(self, node: fx.Node) -> bool:
        return node not in self.created and not node.meta.get("fxpasses", {}).get("role")

    def _spread_rank_local(self) -> None:
        """Carry the rank-local mark forward to every tensor consumer, up to the group's all-reduces."""
        reduced = self._group_reductions()
        for node in self.graph.nodes:
            if (self._original(node) and node.op != "output" and node not in reduced
                    and self._consumes_rank_local(node)):
                self.rank_local.add(node)

    def propagate(self) -> None:
        self._spread_rank_local()
        early = self.early = self._replicate_early()
        for node in list(self.graph.nodes):
            if not self._original(node):
                continue
            sharded = [a for a in node.all_input_nodes if self.layout.get(a) is layouts.SHARD0]
            if not sharded:
                if any(a in early for a in node.all_input_nodes):  # behind a node re-run on all tokens
                    self.touched.add(node)  # (a getitem of an early split): its value is re-made too
                continue
            if self._boundary_shard_of_shard0(node):
                out = next(iter(node.users))
                if node.args[0] not in out.all_input_nodes:  # the value leaves only as this shard
                    self.touched.add(out)
                    node.replace_all_uses_with(node.args[0])
                    self.boundary_out.add(node.args[0])
                    continue
            if node.op == "output":
                sharded = [a for a in sharded if a not in self.boundary_out]
                if sharded:
                    self._replicate_inputs(node, sharded)
                continue
            if node in self.rank_local or node in early:
                self._replicate_inputs(node, sharded)
                continue
            if gf.op_name(node) == "aten::sym_size" and node.args[1] == self.token_dim(node.args[0]):
                for u in list(node.users):
                    self.touched.add(u)
                node.replace_all_uses_with(self.token_count_node())
                continue
            aligned = token_aligned_args(node, self.is_token, self.ndim, self.token_dim)
            if aligned is None or not set(sharded) <= set(aligned):
                self._replicate_inputs(node, sharded)
                continue
            for a in aligned:
                if self.layout.get(a) is not layouts.SHARD0:
                    node.replace_input_with(a, self.local_shard(a))
                    self.touched.add(node)
            td = self.token_dim(node)
            shape_arg_fix(node, self.shard_rows, td or 0)
            self._lay(node, layouts.SHARD0, td)

    # ---- where to gather (see the module docstring) --------------------------------------------
    def _replicate_early(self) -> set[fx.Node]:
        """Token-wise nodes that run on Replicate inputs because every consumer demands Replicate
        and gathering upstream of them moves fewer bytes per token (`fxpasses.gather_points`)."""
        demands: set[fx.Node] = set()   # nodes that take Replicate inputs whatever we decide
        sharded: set[fx.Node] = {n for n, lay in self.layout.items() if lay is layouts.SHARD0}
        for node in self.graph.nodes:
            if not self._original(node):
                continue
            tensor_op = node.op == "call_function" and _tensor_valued(node)
            aligned = token_aligned_args(node, self.is_token, self.ndim, self.token_dim) if tensor_op else None
            into = [a for a in node.all_input_nodes if a in sharded]
            if gf.op_name(node) == SHARD_OP and into:
                continue                 # takes its input sharded (see propagate)
            if node.op == "output" or node in self.rank_local or (tensor_op and aligned is None):
                demands.add(node)
            elif into and tensor_op and set(into) <= set(aligned):
                sharded.add(node)        # Shard0 when it runs on shards
            elif into:
                demands.add(node)        # a sharded input it cannot align: propagation gathers it
        candidates: set[fx.Node] = set()  # every consumer demands Replicate or is a candidate itself
        for node in reversed(self.graph.nodes):
            if (node.op == "call_function" and _tensor_valued(node) and self._original(node)
                    and node not in demands and node.users
                    and all(u in demands or u in candidates for u in node.users)):
                candidates.add(node)
        forced = set()
        if getattr(self.config, "int8_comm", "auto") == "off":  # gather the float input, quantise after
            forced = {n for n in candidates if is_quantize(n)}
        return gather_points.replicated_candidates(self.graph, candidates, demands, sharded, forced,
                                                   self._row_bytes)

    def _row_bytes(self, n: fx.Node) -> float:
        """Bytes per token of `n`'s tensor value(s) (inf when unknown: never chosen to save bytes). A
        node the rewrite inserted has no fake value yet; one that only changes dim 0 (a collective, its
        wait, a pad or a slice of rows) has the row of the value it came from."""
        while gf.val(n) is None and isinstance(n, fx.Node) and gf.op_name(n) in _ROWS_ONLY and n.args:
            n = n.args[0]
        v = gf.val(n)
        vals = v if isinstance(v, (list, tuple)) else [v]
        total = 0
        for t in vals:
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 0:
                return float("inf")
            per = t.element_size()
            for s in t.shape[(token_dim_of(t, self.T) or 0) + 1:]:
                if isinstance(s, torch.SymInt):
                    return float("inf")
                per *= int(s)
            total += per
        return total if total else float("inf")

    def _consumes_rank_local(self, node: fx.Node) -> bool:
        if node not in self.rank_local and not any(a in self.rank_local for a in node.all_input_nodes):
            return False
        # sizes and other scalars computed from a rank-local tensor are not rank-local
        return _tensor_valued(node)

    def _group_reductions(self) -> set[fx.Node]:
        """Result nodes of the graph's remaining all-reduces over this group (rank-local ends there)."""
        out = set()
        for n in self.graph.nodes:
            ar = gf.match_all_reduce(n)
            if ar is not None and ar.runs_on(self.group):
                out.add(ar.result)
        return out

    def _replicate_inputs(self, node: fx.Node, sharded: list[fx.Node]) -> None:
        for a in sharded:
            node.replace_input_with(a, self.gather(a))
        self.touched.add(node)

    def gathered_for(self, node: fx.Node) -> bool:
        """Did propagation gather a value for `node`: right at its inputs, or upstream of the
        token-wise nodes it reads that run on all tokens (`early`)?"""
        seen, todo = set(), list(node.all_input_nodes)
        while todo:
            a = todo.pop()
            if a in seen:
                continue
            seen.add(a)
            if a in self.created:
                return True
            if a in self.early:
                todo.extend(a.all_input_nodes)
        return False

    def dirty_nodes(self) -> set[fx.Node]:
        """Nodes whose fake values may be stale: created, re-laid-out or re-wired by a rewrite."""
        return set(self.created) | set(self.layout) | self.touched


# ---- int8 values + float32 scales in one collective (FlashComm1's gather, MLP-TP's all_gather) ------

def packable(q: fx.Node, sc: fx.Node) -> bool:
    """`q` holds int8 values [R, w] (w a plain int) and `sc` their float32 per-row scales [R] or
    [R, 1]: `pack_int8_scales` can send them as one int8 tensor."""
    qv, sv = gf.val(q), gf.val(sc)
    return (isinstance(qv, torch.Tensor) and qv.dtype == torch.int8 and qv.dim() == 2
            and isinstance(qv.shape[1], int) and isinstance(sv, torch.Tensor)
            and sv.dtype == torch.float32 and (sv.dim() == 1 or (sv.dim() == 2 and sv.shape[1] == 1)))


def pack_int8_scales(graph: fx.Graph, q: fx.Node, sc: fx.Node, mark) -> fx.Node:
    """cat([q, sc.view(int8)], 1): the int8 values [R, w] and their float32 scales as ONE [R, w + 4]
    int8 tensor (each scale's 4 bytes as 4 more int8 columns), so one collective over dim 0 moves
    both (`packable` must hold). Inserted at the graph's insertion point; `mark(node, role)` is
    called on every inserted node and returns it (tagging / bookkeeping of the caller)."""
    return mark(graph.call_function(aten.cat.default, ([q, scale_columns(graph, sc, mark)], 1)), "int8_pack")


def scale_columns(graph: fx.Graph, sc: fx.Node, mark) -> fx.Node:
    """float32 per-row scales [R] or [R, 1] viewed as [R, 4] int8 columns (their bytes)."""
    s2 = mark(graph.call_function(aten.unsqueeze.default, (sc, 1)), "int8_pack") if gf.val(sc).dim() == 1 else sc
    return mark(graph.call_function(aten.view.dtype, (s2, torch.int8)), "int8_pack")


def unpack_int8_scales(graph: fx.Graph, packed: fx.Node, w: int, sdim: int, mark) -> tuple[fx.Node, fx.Node]:
    """The inverse of `pack_int8_scales` on a (gathered) [R', w + 4] int8 tensor: (values [R', w],
    float32 scales [R'] (`sdim` 1) or [R', 1] (`sdim` 2)), both contiguous."""
    qs = mark(graph.call_function(aten.slice.Tensor, (packed, 1, 0, w)), "int8_unpack")
    qg = mark(graph.call_function(aten.clone.default, (qs,), {"memory_format": torch.contiguous_format}),
              "int8_unpack")
    ss = mark(graph.call_function(aten.slice.Tensor, (packed, 1, w, w + 4)), "int8_unpack")
    ss = mark(graph.call_function(aten.clone.default, (ss,), {"memory_format": torch.contiguous_format}),
              "int8_unpack")
    sg = mark(graph.call_function(aten.view.dtype, (ss, torch.float32)), "int8_unpack")
    if sdim == 1:
        sg = mark(graph.call_function(aten.squeeze.dim, (sg, 1)), "int8_unpack")
    return qg, sg
