"""Before/after artifacts of a pass run: graph code files and the site report per rank, the dump
directory's HTML page (`fxpasses.html_report`, rewritten after each graph with every rank's dumps
there at that moment; `fxpasses report DIR` renders it again once the run is over), plus
`torch._logging.trace_structured` artifacts so TORCH_TRACE + tlparse show both graphs."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.fx as fx
from torch._logging import trace_structured

from fxpasses import html_report
from fxpasses.report import PassReport


log = logging.getLogger("fxpasses")
PAGE = "report.html"


def graph_text(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def tracing_enabled() -> bool:
    """True when structured tracing has somewhere to write (TORCH_TRACE set, or a handler someone
    attached); graph text is only generated then. torch always attaches a LazyTraceHandler to the
    trace log, which stays inert without a directory, so that one alone does not count."""
    from torch._logging._internal import LazyTraceHandler, trace_log
    return any(not (isinstance(h, LazyTraceHandler) and h.root_dir is None) for h in trace_log.handlers)


def emit_trace(name: str, text: str) -> None:
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"},
                     payload_fn=lambda: text)


def wanted(graph: fx.Graph, config) -> bool:
    """Graph text is generated only for a dump directory or structured tracing (it costs time)."""
    return graph.owning_module is not None and (bool(config.dump_dir) or tracing_enabled())


def before_text(graph: fx.Graph, config) -> str:
    """The graph's code before the rewrite is committed, or "" when nobody will read it."""
    return graph_text(graph.owning_module) if wanted(graph, config) else ""


def emit(graph: fx.Graph, report: PassReport, config, before: str, tag: str) -> None:
    """After a committed rewrite: trace artifacts (TORCH_TRACE) and the dump directory's files."""
    if not wanted(graph, config):
        return
    after = graph_text(graph.owning_module)
    emit_trace(f"fxpasses_{tag}_rank{report.world_rank}_before", before)
    emit_trace(f"fxpasses_{tag}_rank{report.world_rank}_after", after)
    if config.dump_dir:
        write_dumps(config.dump_dir, report, before, after, tag)


def emit_abandoned(graph: fx.Graph, report: PassReport, config, tag: str) -> None:
    """For a graph kept as it was after planning (nothing to rewrite, or the rewrite abandoned):
    the before-graph and the site report, no after-graph."""
    if config.dump_dir and graph.owning_module is not None:
        write_dumps(config.dump_dir, report, graph_text(graph.owning_module), None, tag)


def write_dumps(dump_dir: str | os.PathLike, report: PassReport, before: str, after: str | None,
                tag: str = "graph") -> Path:
    """Write {dump_dir}/rank{r}/{tag}.before.py, .after.py (not for an abandoned rewrite: `after`
    None), site_report.json/.txt (r: the global rank, which is the TP rank in a single TP group);
    return the folder."""
    out = Path(dump_dir) / f"rank{report.world_rank}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.before.py").write_text(before)
    if after is not None:
        (out / f"{tag}.after.py").write_text(after)
    (out / f"{tag}.site_report.json").write_text(report.to_json())
    (out / "site_report.json").write_text(report.to_json())  # the latest graph of this rank
    (out / "site_report.txt").write_text(report.to_text() + "\n")
    refresh_page(dump_dir)
    return out


def refresh_page(dump_dir: str | os.PathLike) -> None:
    """{dump_dir}/report.html with every rank's dumps there now, replaced atomically (ranks write
    theirs concurrently). Never raises: a page is a convenience, the pass goes on without it."""
    target = Path(dump_dir) / PAGE
    tmp = target.with_name(f".{PAGE}.{os.getpid()}")
    try:
        html_report.write_report(dump_dir, out=tmp)
        os.replace(tmp, target)
    except Exception as e:  # e.g. another rank's report half written at this moment
        log.debug("fxpasses: %s not refreshed: %s", target, e)
        tmp.unlink(missing_ok=True)


def emit_lowered(graph: fx.Graph, report: PassReport, config) -> None:
    """After the lowering (`fxpasses.lowering`) found pairs: the rank's latest site report again, now
    with the lowering's record and lines, and the lowered graph (`lowered.after.py`) when it fused."""
    rec = report.extra.get("lowering") or {}
    if not config.dump_dir or not rec.get("sites"):
        return
    out = Path(config.dump_dir) / f"rank{report.world_rank}"
    out.mkdir(parents=True, exist_ok=True)
    if rec.get("fused") and graph.owning_module is not None:
        (out / "lowered.after.py").write_text(graph_text(graph.owning_module))
    (out / "site_report.json").write_text(report.to_json())
    (out / "site_report.txt").write_text(report.to_text() + "\n")
    refresh_page(config.dump_dir)
