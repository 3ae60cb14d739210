"""Verification run after every rewrite, before the rewritten graph replaces the original.

1. `graph.lint()`; 2. FakeTensor shape propagation (refreshing every stale node's meta["val"],
which Inductor needs downstream): incremental (only nodes the rewrite touched and nodes whose
inputs' metadata changed) and memoised on (operator, input metadata), with a result equal to a
full propagation (tests/test_verify_propagation.py); 3. layout consistency: every value the
rewriter marked Shard0 has T_pad/n rows, every gathered value T rows, and every graph output the
shape and dtype it had before; 4. the collective fingerprint (kind, group, size in graph order),
which callers compare across ranks outside compilation (the harness and CLI compare the digests
after capture; identical everywhere = no rank waits on a collective another rank never issues).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxpasses import graph_forms as gf
from fxpasses import layouts
from fxpasses.errors import VerificationError


def _dims(seq) -> tuple:
    """Sizes/strides as hashable, comparable values (a SymInt by its sympy expression)."""
    return tuple(x.node.expr if isinstance(x, torch.SymInt) else x for x in seq)


def _same_meta(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and _dims(a.shape) == _dims(b.shape)
                and _dims(a.stride()) == _dims(b.stride()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool) and type(a) is type(b):
        return a.node.expr == b.node.expr
    return str(a) == str(b)


def fake_propagate(gm: fx.GraphModule, dirty: set[fx.Node] | None = None, *,
                   graph: fx.Graph | None = None) -> int:
    """FakeTensor shape propagation; returns how many nodes were re-executed.

    `graph` (default `gm.graph`) is the graph to run; `gm` only provides attributes, so a
    rewritten copy can be checked without generating Python code for it.

    With `dirty` (the nodes a rewrite created or changed), only those nodes and the nodes whose
    inputs' fake values really changed (shape, stride or dtype) are re-executed; every other node
    keeps its recorded value. Re-executions are memoised on (operator, input metadata): a decoder
    layer's ops see the same shapes in every layer, so a result already computed in this run is
    rebuilt as a fresh fake tensor of the same size/stride/dtype instead of running the operator's
    fake kernel again. Only results that own fresh storage (no aliasing of an input), carry no
    unbacked symbols and come from ops that cannot change their inputs' metadata are memoised;
    everything else runs for real. The result equals a full propagation at a fraction of the cost."""
    graph = graph if graph is not None else gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in phs]
    if any(v is None for v in vals):
        raise VerificationError("a graph input has no recorded fake value; cannot propagate shapes")
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        raise VerificationError("graph inputs carry no FakeTensorMode; cannot propagate shapes")
    prop = _IncrementalProp(gm, graph, mode, dirty)
    with mode, enable_python_dispatcher():
        prop.propagate_dont_convert_inputs(*vals)
    return prop.executed


class _IncrementalProp(FakeTensorProp):
    """FakeTensorProp that re-runs only stale nodes, memoised on (operator, input metadata) (see
    `fake_propagate`); `dirty` None re-runs every node."""

    def __init__(self, gm: fx.GraphModule, graph: fx.Graph, mode, dirty: set[fx.Node] | None):
        torch.fx.Interpreter.__init__(self, gm, graph=graph)
        self._mode = mode
        mode.epoch += 1
        mode.reset_nt_tensor_id_counter()
        self.seen_subgraphs = set()
        self.dirty, self.memo, self.executed, self.changed = dirty, {}, 0, set()

    def run_node(self, n):
        if n.op in ("placeholder", "output") or self.dirty is None:
            self.executed += 1
            return super().run_node(n)
        stale = n in self.dirty or any(a in self.changed for a in n.all_input_nodes)
        if not stale and "val" in n.meta:
            return n.meta["val"]
        old = n.meta.get("val", _MISSING)
        args = _memo_args(n, self.env)
        key = _memo_key(n, args)
        hit = self.memo.get(key) if key is not None else None
        if hit is not None:
            # a fresh tensor with the memoised metadata (recorded as is: FakeTensorProp's
            # detached snapshot only guards against later in-place metadata changes, which
            # _memo_args rules out by refusing nodes with an aten in-place user)
            out = old if _same_meta(old, hit) else _fresh_like(hit, self._mode)
            n.meta["val"] = out
        else:
            out = super().run_node(n)
            if key is not None:
                if key not in self.memo:
                    self.memo[key] = out if _memoisable(args, out) else None
                if self.memo[key] is not None and _same_meta(old, out):
                    out = n.meta["val"] = old
        # (a fresh result with the metadata the node had keeps its earlier value: it owns its
        # storage, and views downstream that were not re-run still alias it)
        self.executed += 1
        if old is _MISSING or not _same_meta(old, n.meta.get("val")):
            self.changed.add(n)
        return out


def _meta_key(v):
    if isinstance(v, torch.Tensor):
        return ("T", v.dtype, v.device, _dims(v.shape), _dims(v.stride()), _dims((v.storage_offset(),)),
                v.requires_grad)
    if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
        return ("S", type(v).__name__, v.node.expr)
    if isinstance(v, list | tuple):
        return (type(v).__name__, *(_meta_key(x) for x in v))
    if isinstance(v, dict):
        return ("dict", *((k, _meta_key(x)) for k, x in sorted(v.items())))
    if v is None or isinstance(v, bool | int | float | str | torch.dtype | torch.device | torch.layout |
                                 torch.memory_format):
        return (type(v).__name__, v)  # 1, 1.0 and True hash alike; the type keeps them apart
    raise TypeError  # anything else (e.g. an opaque object): not memoised


def _memo_args(n: fx.Node, env: dict):
    """(args, kwargs) with their current values, for an OpOverload call that may be memoised;
    None for anything else (other node kinds, aten in-place ops or nodes with an aten in-place
    user, which may change metadata)."""
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    if _aten_mutable(t) or any(_aten_mutable(u.target) for u in n.users):
        return None
    return torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])


def _memo_key(n: fx.Node, args):
    """(operator, metadata of every argument), or None when not memoisable."""
    if args is None:
        return None
    try:
        return (n.target, _meta_key(args))
    except TypeError:
        return None


def _aten_mutable(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" and target._schema.is_mutable


def _memoisable(args, out) -> bool:
    """True when `out` is a fresh result: plain fake tensors with their own storage at offset 0 and no
    unbacked symbols (so an equal fresh tensor is exactly what re-running the kernel gives)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    from torch.multiprocessing.reductions import StorageWeakRef

    outs = list(out) if isinstance(out, tuple | list) else [out]
    plain = (lambda o: isinstance(o, FakeTensor) and _dims((o.storage_offset(),)) == (0,)  # noqa: E731
             and o.layout == torch.strided and not (o.requires_grad or o.is_conj() or o.is_neg()))
    if not outs or not all(plain(o) for o in outs):
        return False  # only what _fresh_like rebuilds exactly: plain strided tensors at offset 0
    if free_unbacked_symbols(outs):
        return False
    ins = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    seen = {StorageWeakRef(a.untyped_storage()) for a in ins}
    for o in outs:
        ref = StorageWeakRef(o.untyped_storage())
        if ref in seen:
            return False
        seen.add(ref)
    return True


def _fresh_like(template, mode):
    """New fake tensors with `template`'s size, stride and dtype and storage of their own.

    Built directly (a meta tensor wrapped as a FakeTensor of `mode`, as the mode itself does)
    rather than by dispatching `empty_strided`, which costs about twice as much with symbolic sizes."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    def one(o):
        with unset_fake_temporarily():
            m = torch.empty(o.shape, dtype=o.dtype, device="meta")
            if _dims(m.stride()) != _dims(o.stride()):
                m = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device="meta")
        return FakeTensor(mode, m, o.device)
    if isinstance(template, tuple | list):
        return type(template)(one(o) for o in template)
    return one(template)


_MISSING = object()


def output_signature(graph: fx.Graph) -> list:
    out = next(n for n in graph.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(out.args)
    sig = []
    for a in flat:
        v = gf.val(a)
        sig.append((tuple(str(s) for s in v.shape), v.dtype) if isinstance(v, torch.Tensor) else None)
    return sig


def collective_fingerprint(graph: fx.Graph) -> list[tuple[str, str, str]]:
    """(kind, group, rows) of every collective in graph order; group names are normalised to the
    label fxpasses gave them (or the graph's own name for the model's collectives)."""
    fp = []
    for n in graph.nodes:
        kind = gf.collective_kind(n)
        if kind is None:
            continue
        tag = n.meta.get("fxpasses", {})
        group = tag.get("group") or gf.collective_group(n)
        fp.append((kind, str(group), str(tag.get("group_size", ""))))
    return fp


def fingerprint_digest(fp) -> str:
    return hashlib.sha256(json.dumps(fp).encode()).hexdigest()[:16]


@dataclass
class Verification:
    fingerprint: list
    digest: str
    nodes_propagated: int = 0


def verify(gm: torch.nn.Module, rewriter, before_outputs: list, graph: fx.Graph | None = None) -> Verification:
    """Verify `graph` (default `gm.graph`; `gm` supplies attributes) after a rewrite."""
    graph = graph if graph is not None else gm.graph
    try:
        graph.lint()
    except Exception as e:
        raise VerificationError(f"graph.lint failed after the rewrite: {e}") from e
    try:
        dirty = None if rewriter is None else rewriter.dirty_nodes()
        executed = fake_propagate(gm, dirty, graph=graph)
    except VerificationError:
        raise
    except Exception as e:
        raise VerificationError(f"fake-tensor shape propagation failed after the rewrite: "
                                f"{type(e).__name__}: {e}") from e
    if rewriter is not None:
        live = set(graph.nodes)  # erased (dead) nodes keep .graph but are gone
        shard_rows = (rewriter.T + rewriter.n - 1) // rewriter.n  # ceil(T / n), as the rewriter pads
        for node, lay in rewriter.layout.items():
            if node not in live:
                continue
            v = gf.val(node)
            if not isinstance(v, torch.Tensor):
                continue
            td = rewriter.token_dim(node) or 0  # recorded when the value was laid out
            if v.dim() <= td:
                raise VerificationError(f"{node.name} should hold tokens on dim {td}, has shape {list(v.shape)}")
            rows = v.shape[td]
            if lay is layouts.REPLICATE and not _sym_equal(rows, rewriter.T):
                raise VerificationError(f"{node.name} should be Replicate with {rewriter.T} rows, has {rows}")
            if lay is layouts.SHARD0:
                if not _sym_equal(rows, shard_rows):
                    raise VerificationError(f"{node.name} should be Shard0 with {shard_rows} rows, has {rows}")
    after = output_signature(graph)
    if after != before_outputs:
        raise VerificationError(f"graph outputs changed shape/dtype: {before_outputs} -> {after}")
    fp = collective_fingerprint(graph)
    return Verification(fp, fingerprint_digest(fp), executed)


def _sym_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr:
        return True  # the same expression: no need to ask the shape environment
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:
        return str(a) == str(b)
