"""The verifier's incremental, memoised FakeTensor propagation must record exactly what a full
propagation records: for every node the same size/stride/dtype (symbolic expressions compared
structurally) and the same aliasing (which nodes' values share storage, which Inductor's
re-inplacing pass reads). Checked on synthetic post-grad graphs (fxpasses.testing.synthetic_graphs
builds them from the real vLLM layer classes, with FakeTensor values and a symbolic token count), one
process, no collectives run: this is a property of the graph, not of the numbers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dispatch.python import enable_python_dispatcher
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from fxpasses.config import FxPassesConfig
from fxpasses.graph_copy import copy_graph
from fxpasses.pipeline import run_passes
from fxpasses.testing.synthetic_graphs import ModelShape, build_graph, tp_context
from fxpasses.verify import fake_propagate
from helpers import examples


def _dims(seq):
    return tuple(x.node.expr if isinstance(x, torch.SymInt) else x for x in seq)


def signature(graph: torch.fx.Graph) -> list:
    """Per node: (name, [(dtype, sizes, strides, offset, storage class) | sym expr, ...]).
    Storage classes are numbered by first appearance, so two graphs compare equal exactly when
    the same nodes share storage."""
    storages: dict = {}
    sig = []
    for n in graph.nodes:
        entry = []
        for v in tree_leaves(n.meta.get("val")):
            if isinstance(v, torch.Tensor):
                sid = storages.setdefault(StorageWeakRef(v.untyped_storage()), len(storages))
                entry.append((v.dtype, _dims(v.shape), _dims(v.stride()), _dims((v.storage_offset(),)), sid))
            elif isinstance(v, torch.SymInt):
                entry.append(("sym", v.node.expr))
            else:
                entry.append(repr(v))
        sig.append((n.name, entry))
    return sig


def rewrite_and_reference(shape: ModelShape, tp: int, strategies: str):
    """(incremental signature, full-propagation signature, report) for one rewritten graph.
    (FlashComm2 with K > 1 needs real ODP/OTP process groups; K = 1 runs on the TP group.)"""
    with enable_python_dispatcher():
        gm = build_graph(shape, tp)
        rep = run_passes(gm.graph, FxPassesConfig.from_dict({"strategies": strategies}), tp_context(tp))
        assert rep.applied, rep.reason
        incremental = signature(gm.graph)
        ref = torch.fx.GraphModule(gm, copy_graph(gm.graph))  # meta dicts copied, values shared
        fake_propagate(ref)                                       # full: every node re-executed
        return incremental, signature(ref.graph), rep


def small(layers: int, mla: bool) -> ModelShape:
    if mla:
        return ModelShape("tinymla", layers, 64, 8, 8, 16, 96, 512, mla=True, q_lora=32, kv_lora=16,
                          rope_dim=8, nope_dim=16, v_head_dim=16)
    return ModelShape("tiny", layers, 64, 8, 8, 16, 96, 512)


@settings(max_examples=examples(8), deadline=None)
@given(tp=st.sampled_from([2, 4, 8]), layers=st.integers(1, 3), mla=st.booleans(),
       strategies=st.sampled_from(["flashcomm1", "flashcomm2", "flashcomm1+flashcomm2"]))
def test_incremental_propagation_equals_full(tp, layers, mla, strategies):
    inc, full, rep = rewrite_and_reference(small(layers, mla), tp, strategies)
    assert [n for n, _ in inc] == [n for n, _ in full]
    diff = [(a, b) for a, b in zip(inc, full) if a != b]
    assert not diff, f"{len(diff)} nodes differ, first: {diff[0]}"
    # the shortcut really was taken: fewer nodes re-run than the graph has
    assert rep.extra["nodes_repropagated"] < len(inc)


def test_signature_sees_a_wrong_shape_and_broken_aliasing():
    """The comparison above can fail: a value with the wrong rows, or a view that no longer shares
    its base's storage, changes the signature."""
    with enable_python_dispatcher():
        gm = build_graph(small(1, False), 2)
        base = signature(gm.graph)
        view = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.permute.default)
        mode = view.meta["val"].fake_mode
        old = view.meta["val"]
        with mode:
            view.meta["val"] = torch.empty_strided(old.shape, old.stride(), dtype=old.dtype)  # fresh storage
        assert signature(gm.graph) != base
        view.meta["val"] = old
        assert signature(gm.graph) == base
        mm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default)
        with mode:
            mm.meta["val"] = torch.empty(mm.meta["val"].shape[0] + 1, mm.meta["val"].shape[1],
                                         dtype=mm.meta["val"].dtype)
        assert signature(gm.graph) != base


@pytest.mark.parametrize("strategies", ["flashcomm1", "flashcomm2"])
def test_rewritten_graph_object_is_consistent(strategies):
    """The rewritten nodes are moved into the graph object the caller holds: every node points at
    it, the lookup table finds the new collectives, lint passes and the module's code regenerates."""
    with enable_python_dispatcher():
        gm = build_graph(small(2, False), 2)
        graph = gm.graph
        rep = run_passes(graph, FxPassesConfig.from_dict({"strategies": strategies}), tp_context(2))
    assert rep.applied and gm.graph is graph
    assert all(n.graph is graph for n in graph.nodes)
    graph.lint()
    c10d = torch.ops._c10d_functional
    found = graph.find_nodes(op="call_function", target=c10d.reduce_scatter_tensor.default) + \
        graph.find_nodes(op="call_function", target=c10d.all_to_all_single.default)
    assert len(found) == sum(rep.after.get(k, 0) for k in ("reduce_scatter", "all_to_all")) > 0
    assert not graph.find_nodes(op="call_function", target=c10d.all_reduce.default)
    assert "reduce_scatter_tensor" in gm.code or "all_to_all_single" in gm.code


def test_trace_artifacts_only_when_tracing():
    """With a structured-trace handler attached (what TORCH_TRACE installs), the before/after graph
    text is emitted as `trace_structured` artifacts for tlparse; without one no text is made."""
    import logging

    from torch._logging._internal import LazyTraceHandler, trace_log

    from fxpasses import dump

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    def run():
        with enable_python_dispatcher():
            gm = build_graph(small(1, False), 2)
            rep = run_passes(gm.graph, FxPassesConfig.from_dict({"strategies": "flashcomm1"}), tp_context(2),
                             tag="traced")
        assert rep.applied
        return rep

    made = []
    real_text, saved, level = dump.graph_text, list(trace_log.handlers), trace_log.level
    dump.graph_text = lambda gm: made.append(1) or real_text(gm)
    grab = Grab()
    try:
        trace_log.handlers = [LazyTraceHandler(None)]  # what torch installs without TORCH_TRACE
        assert not dump.tracing_enabled()
        run()
        assert made == []
        trace_log.handlers = [grab]
        trace_log.setLevel(logging.DEBUG)
        assert dump.tracing_enabled()
        run()
        assert len(made) == 2  # before and after text
    finally:
        dump.graph_text = real_text
        trace_log.handlers = saved
        trace_log.setLevel(level)
    arts = {r.metadata["artifact"]["name"]: r.payload for r in grab.records
            if "artifact" in getattr(r, "metadata", {})}
    assert set(arts) >= {"fxpasses_traced_rank0_before", "fxpasses_traced_rank0_after"}
    assert "all_reduce" in arts["fxpasses_traced_rank0_before"]
    assert "all_reduce" not in arts["fxpasses_traced_rank0_after"]
    assert "reduce_scatter_tensor" in arts["fxpasses_traced_rank0_after"]


def test_a_specialised_size_equals_its_int():
    """A SymInt whose expression is a constant (a size Dynamo specialised, e.g. a recompile for
    T = 2) is the same size as that int, for token detection and for the verifier's row check; a
    free symbol is not, and neither is another constant."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fxpasses import graph_forms as gf
    from fxpasses.verify import _sym_equal

    env = ShapeEnv()
    free = env.create_unbacked_symint()
    two = torch.SymInt(free.node.wrap_int(2))
    assert gf.same_size(two, 2) and gf.same_size(2, two) and _sym_equal(two, 2)
    assert not gf.same_size(two, 3) and not _sym_equal(two, 3)
    assert not gf.same_size(free, 2) and not _sym_equal(free, 2)
