"""The pass pipeline: find sites -> plan -> rewrite -> propagate -> verify, transactionally.

`run_passes(graph, config, ctx)` is the one entry point (used by the vLLM pass, the CLI and the
tests). The rewrite happens on a copy of the graph; only a copy that verifies replaces the
original, so a failure leaves the graph exactly as it was (and, with `strict`, raises).
"""
from __future__ import annotations

import itertools
import logging
import time

import torch
import torch.fx as fx

from fxpasses import dump as dumps
from fxpasses import graph_forms as gf
from fxpasses.comm import CommBackend
from fxpasses.config import DP_STRATEGIES, FxPassesConfig
from fxpasses.context import TPContext
from fxpasses.errors import FxPassesError, RewriteError, VerificationError
from fxpasses.patterns_loader import PatternSet, load_patterns
from fxpasses.plan import plan_sites
from fxpasses.report import PassReport, collective_counts
from fxpasses.rewriter import LayoutRewriter
from fxpasses.sites import find_sites
from fxpasses.strategies import dp_common, flashcomm1, flashcomm2, mlp_tp, otp
from fxpasses.verify import check_fingerprint_across_ranks, output_signature, verify

log = logging.getLogger("fxpasses")
_graph_ids = itertools.count()

STRATEGY_MODULES = {"flashcomm2": flashcomm2, "flashcomm1": flashcomm1, "otp": otp, "mlp_tp": mlp_tp}


def copy_graph(graph: fx.Graph, owning_module=None) -> fx.Graph:
    g = fx.Graph(owning_module=owning_module)
    out = g.graph_copy(graph, {})
    g.output(out)
    return g


# the private fields that make up an fx.Graph's node list (torch is pinned; checked before use)
_GRAPH_NODE_STATE = ("_root", "_used_names", "_insert", "_len", "_graph_namespace", "_find_nodes_lookup_table")


def replace_graph_contents(dst: fx.Graph, src: fx.Graph) -> None:
    """Make `dst` (the object Inductor holds) contain `src`'s nodes; `src` is left empty.

    The nodes are moved, not copied (a copy of an 80-layer graph costs about half a second here):
    the node list, name tables and lookup table pass to `dst` and every node is re-pointed at it.
    If this torch's Graph does not have the expected fields, the nodes are copied instead."""
    if all(hasattr(g, a) for g in (dst, src) for a in _GRAPH_NODE_STATE):
        for a in _GRAPH_NODE_STATE:
            setattr(dst, a, getattr(src, a))
        for n in (dst._root, *dst.nodes):
            object.__setattr__(n, "graph", dst)  # Node.__setattr__ would consult the old lookup table
        fx.Graph.__init__(src, owning_module=None)
        return
    for n in reversed(list(dst.nodes)):
        dst.erase_node(n)
    dst._graph_namespace = type(dst._graph_namespace)()  # reuse the original node names
    out = dst.graph_copy(src, {})
    dst.output(out)


def _token_count(plans, rw_probe_T=None):
    """The token count T: dim 0 of the first row/embedding site's all-reduced tensor."""
    for p in plans:
        ar = p.site.all_reduce
        if p.strategy and ar is not None:
            v = gf.val(ar.input)
            if v is not None and v.dim() >= 1:
                return v.shape[0]
    return None


def run_passes(graph: fx.Graph, config: FxPassesConfig, ctx: TPContext, *,
               patterns: PatternSet | None = None, cross_rank_check: bool = False,
               tag: str | None = None, recompile: bool = True) -> PassReport:
    """Rewrite `graph` in place (or leave it untouched and say why in the report).

    `recompile=False` skips regenerating the owning module's Python code; the vLLM pass uses it
    because Inductor recompiles the module itself after its post-grad passes."""
    t0 = time.perf_counter()
    report = PassReport(ctx.rank, ctx.tp, list(config.strategies))
    gm = graph.owning_module
    before_counts = collective_counts(graph)
    report.before = report.after = before_counts
    timings = report.extra.setdefault("timings_ms", {})

    def done(reason: str = "") -> PassReport:
        report.reason = reason or report.reason
        timings["total"] = round((time.perf_counter() - t0) * 1e3, 3)
        log.info("%s", report.to_text().splitlines()[0] + (f" | {report.diff}" if report.applied else ""))
        return report

    if not config.strategies:
        return done("no strategy enabled")
    tp_strats = [s for s in config.strategies if s in STRATEGY_MODULES]
    if not tp_strats:
        return done(f"strategies {config.strategies} are not implemented in this version")
    dp_mode = all(s in DP_STRATEGIES for s in tp_strats)  # otp/mlp_tp: TP=1 graphs, groups from dp_groups
    if not dp_mode and (ctx.tp < 2 or ctx.tp_group is None):
        return done(f"tp={ctx.tp}: nothing to rewrite")
    if dp_mode and ctx.world < 2:
        return done(f"world={ctx.world}: nothing to rewrite")

    patterns = patterns or load_patterns(config.patterns)
    t = time.perf_counter()
    work = copy_graph(graph, gm)
    sites = find_sites(work, patterns, config.module_prefix)
    timings["find_sites"] = round((time.perf_counter() - t) * 1e3, 3)
    t = time.perf_counter()
    plans = plan_sites(sites, config, patterns)
    report.sites = plans
    timings["plan"] = round((time.perf_counter() - t) * 1e3, 3)
    if not any(p.strategy for p in plans):
        return done("no site is owned by an enabled strategy" if sites else "the graph has no linear sites")

    T = dp_common.token_count(plans) if dp_mode else _token_count(plans)
    if T is None:
        return done("no owned site has a TP all-reduce; nothing to rewrite")
    if config.min_tokens and isinstance(T, int) and T < config.min_tokens:
        for p in plans:
            if p.strategy:
                p.status, p.reason = "skipped", f"graph compiled for {T} tokens < min_tokens={config.min_tokens}"
        return done(f"graph compiled for {T} tokens < min_tokens={config.min_tokens}")

    forms = {p.site.all_reduce.form for p in plans if p.site.all_reduce is not None}
    comm = CommBackend.for_forms(forms)
    before_sig = output_signature(graph)
    try:
        t = time.perf_counter()
        group, grank = dp_common.rewriter_group(ctx, config) if dp_mode else (ctx.tp_group, ctx.rank)
        rw = LayoutRewriter(work, group, grank, comm, T, config)
        for name in tp_strats:
            STRATEGY_MODULES[name].rewrite(rw, plans, ctx)
        rw.propagate()
        work.eliminate_dead_code()
        timings["rewrite"] = round((time.perf_counter() - t) * 1e3, 3)
        if not any(p.status == "rewritten" for p in plans):
            return done("every owned site was skipped")
        t = time.perf_counter()
        # verify the copy in place: `gm` only supplies attributes (no code generation for the copy)
        ver = verify(gm if gm is not None else torch.nn.Module(), rw, before_sig, graph=work)
        timings["verify"] = round((time.perf_counter() - t) * 1e3, 3)
        report.extra["nodes"] = len(work.nodes)
        report.extra["nodes_repropagated"] = ver.nodes_propagated
        if cross_rank_check:
            check_fingerprint_across_ranks(ver.digest)
    except FxPassesError as e:
        for p in plans:
            if p.status == "rewritten":
                p.status, p.reason = "skipped", f"graph kept unchanged: {e}"
        if config.strict:
            raise
        return done(f"rewrite abandoned, original graph kept: {e}")
    except Exception as e:  # an unexpected failure must not leave a half-rewritten graph either
        if config.strict:
            raise RewriteError(f"rewrite failed: {type(e).__name__}: {e}") from e
        log.exception("fxpasses: rewrite failed; original graph kept")
        return done(f"rewrite failed, original graph kept: {type(e).__name__}: {e}")
    if config.strict:
        skipped = [p for p in plans if p.status == "skipped"]
        if skipped:
            raise RewriteError("strict mode: sites could not be rewritten: " +
                               "; ".join(f"{p.site.prefix}: {p.reason}" for p in skipped))

    t = time.perf_counter()
    want_text = gm is not None and (bool(config.dump_dir) or dumps.tracing_enabled())
    before_text = dumps.graph_text(gm) if want_text else ""
    replace_graph_contents(graph, work)
    if gm is not None and recompile:
        gm.recompile()
    report.applied = True
    report.notes.extend(rw.notes)
    report.extra.update(rw.extra)
    report.after = collective_counts(graph)
    report.fingerprint, report.digest = ver.fingerprint, ver.digest
    timings["apply"] = round((time.perf_counter() - t) * 1e3, 3)
    gid = tag or f"graph{next(_graph_ids)}"
    if want_text:
        after_text = dumps.graph_text(gm)
        dumps.emit_trace(f"fxpasses_{gid}_rank{ctx.rank}_before", before_text or "")
        dumps.emit_trace(f"fxpasses_{gid}_rank{ctx.rank}_after", after_text)
        if config.dump_dir:
            dumps.write_dumps(config.dump_dir, report, before_text, after_text, gid)
    return done()
