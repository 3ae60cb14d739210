"""Verification run after every rewrite, before the rewritten graph replaces the original.

1. `graph.lint()`; 2. FakeTensor shape propagation over the whole graph (refreshing every
node's meta["val"], which Inductor needs downstream); 3. layout consistency: every value the
rewriter marked Shard0 has T_pad/n rows, every gathered value T rows, and every graph output the
shape and dtype it had before; 4. the collective fingerprint (kind, group, size in graph order),
which `check_fingerprint_across_ranks` compares over a process group (identical everywhere =
no rank waits on a collective another rank never issues).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpasses import graph_forms as gf
from fxpasses import layouts
from fxpasses.errors import VerificationError


def _same_meta(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and [str(x) for x in a.shape] == [str(x) for x in b.shape]
                and [str(x) for x in a.stride()] == [str(x) for x in b.stride()])
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return str(a) == str(b)


def fake_propagate(gm: fx.GraphModule, dirty: set[fx.Node] | None = None) -> int:
    """FakeTensor shape propagation; returns how many nodes were re-executed.

    With `dirty` (the nodes a rewrite created or changed), only those nodes and the nodes whose
    inputs' fake values really changed (shape, stride or dtype) are re-executed; every other node
    keeps its recorded value. The result equals a full propagation at a fraction of the cost."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in phs]
    if any(v is None for v in vals):
        raise VerificationError("a graph input has no recorded fake value; cannot propagate shapes")
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:
        raise VerificationError("graph inputs carry no FakeTensorMode; cannot propagate shapes")

    class _Prop(FakeTensorProp):
        executed = 0
        changed: set = set()

        def run_node(self, n):
            if n.op in ("placeholder", "output") or dirty is None:
                self.executed += 1
                return super().run_node(n)
            stale = n in dirty or any(a in self.changed for a in n.all_input_nodes)
            if not stale and "val" in n.meta:
                return n.meta["val"]
            old = n.meta.get("val", _MISSING)
            out = super().run_node(n)
            self.executed += 1
            if old is _MISSING or not _same_meta(old, n.meta.get("val")):
                self.changed.add(n)
            return out

    prop = _Prop(gm, mode)
    with mode, enable_python_dispatcher():
        prop.propagate_dont_convert_inputs(*vals)
    return prop.executed


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


def verify(gm: fx.GraphModule, rewriter, before_outputs: list) -> Verification:
    try:
        gm.graph.lint()
    except Exception as e:
        raise VerificationError(f"graph.lint failed after the rewrite: {e}") from e
    try:
        dirty = None if rewriter is None else rewriter.dirty_nodes()
        executed = fake_propagate(gm, dirty)
    except VerificationError:
        raise
    except Exception as e:
        raise VerificationError(f"fake-tensor shape propagation failed after the rewrite: "
                                f"{type(e).__name__}: {e}") from e
    if rewriter is not None:
        live = set(gm.graph.nodes)  # erased (dead) nodes keep .graph but are gone
        for node, lay in rewriter.layout.items():
            if node not in live:
                continue
            v = gf.val(node)
            if not isinstance(v, torch.Tensor):
                continue
            rows = v.shape[0]
            if lay is layouts.REPLICATE and not gf.same_size(rows, rewriter.T):
                raise VerificationError(f"{node.name} should be Replicate with {rewriter.T} rows, has {rows}")
            if lay is layouts.SHARD0:
                expect = (rewriter.T + (-rewriter.T) % rewriter.n) // rewriter.n
                if not _sym_equal(rows, expect):
                    raise VerificationError(f"{node.name} should be Shard0 with {expect} rows, has {rows}")
    after = output_signature(gm.graph)
    if after != before_outputs:
        raise VerificationError(f"graph outputs changed shape/dtype: {before_outputs} -> {after}")
    fp = collective_fingerprint(gm.graph)
    return Verification(fp, fingerprint_digest(fp), executed)


def _sym_equal(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:
        return str(a) == str(b)


def check_fingerprint_across_ranks(digest: str, group=None) -> None:
    """Raise unless every rank of `group` produced the same collective fingerprint."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    world = dist.get_world_size(group)
    got: list = [None] * world
    with unset_fake_temporarily():  # the pass runs inside the compiler's fake mode
        dist.all_gather_object(got, digest, group=group)
    if len(set(got)) != 1:
        raise VerificationError(f"collective sequences differ across ranks: {got}; a rank would wait on a "
                                "collective another rank never issues")
