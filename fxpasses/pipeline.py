"""The pass pipeline: find sites -> plan -> rewrite -> verify -> commit, transactionally.

`run_passes(graph, config, ctx)` is the one entry point (used by the vLLM pass, the CLI and the
tests). The rewrite happens on a copy of the graph (`fxpasses.graph_copy`); only a copy that
verifies replaces the original, so a failure leaves the graph exactly as it was (and, with
`strict`, raises: `_failed` is the whole failure policy). A rewrite that would put more bytes
on the wire per step than the original graph is not kept as it is: the costly layers' sites are
backed off and the rest rewritten again (`_back_off_costly_sites`), and with `min_tokens: auto` a
rewrite the cost model finds slower over the token range vLLM runs the graph at is not kept
(`_slower`, `fxpasses.token_gate`). A graph that
keeps its original form after planning (nothing owned, every site skipped, the rewrite abandoned)
still gets its site report and before-graph in the dump directory. Which strategies exist and
what kind of graph they rewrite comes from the strategy registry (`fxpasses.strategies.registry`).
Last, whatever graph stays (rewritten or not) is lowered: matmul + collective pairs become fused
kernels where the platform has them (`fxpasses.lowering`, the `lowering` key).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from fxpasses import comm_volume, dump, link_costs, token_gate
from fxpasses.comm import CommBackend
from fxpasses.config import FxPassesConfig
from fxpasses.context import TPContext
from fxpasses.errors import FxPassesError, ModelledSlowerError, RewriteError, WireBytesError
from fxpasses.graph_copy import copy_graph, replace_graph_contents
from fxpasses.graph_mode import WHOLE_BY_CALLER, GraphMode
from fxpasses.lowering import lower as lowering
from fxpasses.patterns_loader import PatternSet, load_patterns
from fxpasses.plan import plan_sites
from fxpasses.report import PassReport, collective_counts
from fxpasses.rewriter import LayoutRewriter
from fxpasses.site_records import SitePlan, SiteStatus
from fxpasses.sites import find_sites
from fxpasses.strategies import registry as strategies
from fxpasses.verify import output_signature, verify

log = logging.getLogger("fxpasses")
_graph_ids = itertools.count()


@dataclass(frozen=True)
class PassOptions:
    """How one `run_passes` call treats its graph (its keyword arguments).

    `patterns`: the pattern set (default: the configuration's). `tag`: the dump's file stem.
    `recompile=False` skips regenerating the owning module's Python code; the vLLM pass uses it
    because Inductor recompiles the module itself after its post-grad passes. `fail_loudly=True`
    raises when a started rewrite fails instead of keeping the original graph: where the other
    ranks of the group run their rewritten graphs (the vLLM pass), a rank that kept its original
    would issue other collectives than its peers. `graph_mode` says whether the graph is the whole
    model or one piece of vLLM's FX split (`fxpasses.graph_mode`); it is stated in the report, and a
    piece's inputs and outputs keep their original (replicated) layout either way. `token_range`:
    the token counts vLLM will run this graph at ([lo, hi], hi None when unknown); with
    `min_tokens: auto` a rewrite is kept only where `fxpasses.token_gate.judge` says it is no
    slower over that range (None, library use: the caller chose the graph, it is rewritten)."""

    patterns: PatternSet | None = None
    tag: str | None = None
    recompile: bool = True
    fail_loudly: bool = False
    graph_mode: GraphMode = WHOLE_BY_CALLER
    token_range: tuple[int, int | None] | None = None


def run_passes(graph: fx.Graph, config: FxPassesConfig, ctx: TPContext, **options) -> PassReport:
    """Rewrite `graph` in place (or leave it untouched and say why in the report), then lower it:
    the graph as it now is, rewritten or not, gets its matmul + collective pairs fused by the
    backend the `lowering` key picks (`fxpasses.lowering`; nothing on CPU unless `reference`), with
    the record in `report.extra["lowering"]`. `options`: the fields of `PassOptions`."""
    opts = PassOptions(**options)
    report = _run_strategies(graph, config, ctx, opts)
    if config.lowering != "off":
        with report.timed("lowering"):
            rec = lowering.lower_graph(graph, config.lowering, ctx, module_prefix=config.module_prefix,
                                       weight_format=config.weight_format)
        report.extra["lowering"] = rec
        if rec["fused"] and graph.owning_module is not None and opts.recompile:
            graph.owning_module.recompile()
        dump.emit_lowered(graph, report, config)
    return report


def _run_strategies(graph: fx.Graph, config: FxPassesConfig, ctx: TPContext, opts: PassOptions,
                    attempt: "Attempt | None" = None) -> PassReport:
    """The rewrite of `run_passes`, without the lowering; `attempt`: what earlier attempts at this
    graph decided (`Attempt`)."""
    attempt = attempt or Attempt()
    report = PassReport(ctx.rank, ctx.tp, list(config.strategies), before=collective_counts(graph),
                        global_rank=ctx.global_rank)
    report.after = report.before
    report.extra["graph_mode"] = opts.graph_mode.to_dict()
    with report.timed("total"):
        why = _nothing_to_do(config, ctx)
        if why:
            return _finish(report, why)
        work = copy_graph(graph, graph.owning_module)
        with report.timed("find_sites"):
            opts = replace(opts, patterns=opts.patterns or load_patterns(config.patterns))
            sites = find_sites(work, opts.patterns, config.module_prefix)
        with report.timed("plan"):
            report.sites = plans = plan_sites(sites, config, opts.patterns, attempt.left_out)
            for p in plans:
                if p.status is SiteStatus.PLANNED and p.site.prefix in attempt.backed_off.sites:
                    p.skip(attempt.backed_off.sites[p.site.prefix])
        why = _nothing_owned(plans, config, sites)
        if why:
            return _kept(report, why, graph, config, opts.tag)
        try:
            rw, ver = _rewrite_and_verify(graph, work, plans, config, ctx, opts, report)
        except WireBytesError as e:
            return _refused_for_bytes(e, graph, config, ctx, opts, report, attempt)
        except Exception as e:
            return _finish(report, _abandon(e, graph, report, plans, config, ctx, opts))
        if rw is None:
            return _kept(report, "every owned site was skipped", graph, config, opts.tag)
        _commit(graph, work, report, rw, ver, config, opts)
    return _finish(report)


def _rewrite_and_verify(graph: fx.Graph, work: fx.Graph, plans: list[SitePlan], config: FxPassesConfig,
                        ctx: TPContext, opts: PassOptions, report: PassReport):
    """(rewriter, verification) of the rewritten copy, or (None, None) when every owned site was
    skipped; WireBytesError when the bytes rule or the token gate refuses it."""
    with report.timed("rewrite"):
        rw = _rewrite(work, plans, config, ctx)
    if not any(p.status is SiteStatus.REWRITTEN for p in plans):
        _enforce_strict(plans, config)
        return None, None
    with report.timed("verify"):
        ver = verify(graph.owning_module or torch.nn.Module(), rw, output_signature(graph), graph=work)
        more = _more_bytes(graph, work, config, ctx, report, rw.T, opts.graph_mode)
        if more:
            raise WireBytesError(more)
        slower = _slower(graph, work, config, ctx, report, opts.token_range)
        if slower:
            raise ModelledSlowerError(slower)
    return rw, ver


def _refused_for_bytes(e: WireBytesError, graph: fx.Graph, config: FxPassesConfig, ctx: TPContext,
                       opts: PassOptions, report: PassReport, attempt: "Attempt") -> PassReport:
    """The rewrite would send more bytes (or is modelled slower): back off the costly sites and
    rewrite the rest, else leave out the layer-spanning strategy and let the others rewrite alone,
    else keep the original graph. `report.sites`: the refused attempt's plans."""
    plans = report.sites
    retry = None if isinstance(e, ModelledSlowerError) else _back_off_costly_sites(
        report, plans, config, attempt.backed_off,
        lambda b: _run_strategies(graph, config, ctx, opts, replace(attempt, backed_off=b)))
    if retry is not None:
        return retry
    rest = [n for n in config.strategies if not strategies.get(n).spans_layers]
    if not rest or len(rest) == len(config.strategies):
        return _finish(report, _abandon(e, graph, report, plans, config, ctx, opts))
    # the layer-spanning strategy costs the bytes (a piece's boundaries, excluded layers):
    # the others still pay on their own, decided from the same shapes on every rank
    dropped = [n for n in config.strategies if n not in rest]
    retry = _run_strategies(graph, config.replace(strategies=rest), ctx, opts,
                            Attempt(left_out={n: str(e) for n in dropped}))
    retry.strategies = list(config.strategies)
    retry.extra["left_out"] = {n: str(e) for n in dropped}
    retry.notes.insert(0, f"{'+'.join(dropped)} left out: {e}")
    return retry


def _commit(graph: fx.Graph, work: fx.Graph, report: PassReport, rw: LayoutRewriter, ver,
            config: FxPassesConfig, opts: PassOptions) -> None:
    """The verified copy replaces the original graph's contents; the report and dumps say so."""
    _enforce_strict(report.sites, config)
    with report.timed("apply"):
        before_text = dump.before_text(graph, config)
        replace_graph_contents(graph, work)
        if graph.owning_module is not None and opts.recompile:
            graph.owning_module.recompile()
    report.record_applied(rw, ver, collective_counts(graph), nodes=len(graph.nodes))
    dump.emit(graph, report, config, before_text, opts.tag or f"graph{next(_graph_ids)}")


def _more_bytes(before: fx.Graph, after: fx.Graph, config: FxPassesConfig, ctx: TPContext,
                report: PassReport, tokens, graph_mode: GraphMode = WHOLE_BY_CALLER) -> str | None:
    """Why the rewritten graph may not be kept for its bytes on the wire, or None. Per step (one
    forward), each rank's send bytes as `fxpasses.comm_volume` counts them, at the graph's static
    token count, or at `comm_volume.REFERENCE_TOKENS` x the group size for a symbolic one (where
    the padding of every collective is zero). Graph families whose original graph is a TP=1 graph
    (DP attention: OTP, MLP-TP) add their communication by design and are not held to it."""
    if not config.family().bounded_by_original_bytes:
        return None
    sizes = _tp_group_sizes(ctx)
    static = tokens if isinstance(tokens, int) else None
    v0, v1, tokens = comm_volume.step_bytes_pair(before, after, sizes, ctx.tp, static)
    b0, b1 = v0["total"], v1["total"]
    report.extra["bytes_per_step"] = {"tokens": tokens, "before": b0, "after": b1,
                                      "ratio": round(b1 / b0, 4) if b0 else None,
                                      "grew": {k: [v0["layers"].get(k, 0), v] for k, v in v1["layers"].items()
                                               if v > v0["layers"].get(k, 0)},
                                      "layers": {k: [v0["layers"].get(k, 0), v1["layers"].get(k, 0)]
                                                 for k in dict.fromkeys([*v0["layers"], *v1["layers"]])}}
    if b1 <= b0:
        return None
    grew = [f"{'layer ' if k.isdigit() else ''}{k} {v0['layers'].get(k, 0):.0f} -> {v:.0f}"
            for k, v in v1["layers"].items() if v > v0["layers"].get(k, 0)]
    head = (f"the rewritten graph would send {b1:.0f} bytes per step per rank against {b0:.0f} without "
            f"the pass (at {tokens} tokens; more in {', '.join(grew)}); every site is left as it was. ")
    if graph_mode.is_piece:
        return head + ("This graph is one piece of vLLM's FX split, so every token tensor crossing its "
                       "boundary stays replicated (gathered before the piece ends): sequence parallelism "
                       "across layers needs the whole graph: " + graph_mode.whole_graph_setting)
    return head + ("A layer left in its original layout between sharded ones costs an all-gather at each "
                   "boundary: exclude fewer sites, or none")


#: rounds of per-site back-off before the rewrite is given up as a whole
BACK_OFF_ROUNDS = 4


@dataclass(frozen=True)
class BackOff:
    """The sites earlier attempts left as they were ({prefix: why}) and how many rounds made them."""

    sites: dict[str, str] = field(default_factory=dict)
    rounds: int = 0


@dataclass(frozen=True)
class Attempt:
    """What earlier attempts at one graph decided: the enabled strategies left out for it ({name:
    why}) and the sites backed off (`BackOff`). The first attempt has neither."""

    left_out: dict[str, str] = field(default_factory=dict)
    backed_off: BackOff = field(default_factory=BackOff)


def _back_off_costly_sites(report: PassReport, plans: list[SitePlan], config: FxPassesConfig,
                           backed_off: BackOff, retry) -> PassReport | None:
    """The rewrite would send more bytes in some layers (`_more_bytes` lists them): leave those
    layers' sites as they are (the layer-spanning strategy's first; with them their gathers go) and
    rewrite the rest again (`retry(backed_off)`), at most BACK_OFF_ROUNDS times. None when there is
    nothing to back off, no site would be left, or the rounds are spent (the caller refuses the whole
    rewrite, as before). Read off shapes every rank shares: every rank backs off the same sites."""
    step = report.extra.get("bytes_per_step", {})
    grew = step.get("grew") or {}
    if not grew or step.get("after", 0) <= step.get("before", 0) or backed_off.rounds >= BACK_OFF_ROUNDS:
        return None
    spanning = {n for n in config.strategies if strategies.get(n).spans_layers}
    owned = [p for p in plans if p.strategy and p.status in (SiteStatus.PLANNED, SiteStatus.REWRITTEN)]
    # a site outside the decoder layers (embedding, head) belongs to "pre" or "post"
    in_grown = [p for p in owned if ({comm_volume.layer_of(p.site.prefix)} & set(grew)
                                     or comm_volume.layer_of(p.site.prefix) is None and {"pre", "post"} & set(grew))]
    costly = [p for p in in_grown if p.strategy in spanning] or in_grown
    if not costly or len(costly) == len(owned):
        return None
    layers = ", ".join(f"{'layer ' if k.isdigit() else ''}{k} {b0:.0f} -> {b1:.0f}" for k, (b0, b1) in grew.items())
    why = (f"backed off (round {backed_off.rounds + 1}): with every owned site rewritten the graph "
           f"would send more bytes per step in {layers} (at {report.extra['bytes_per_step']['tokens']} tokens); "
           "these sites stay as they were and the others are rewritten")
    out = retry(BackOff({**backed_off.sites, **{p.site.prefix: why for p in costly}}, backed_off.rounds + 1))
    final = {p.site.prefix: p.reason for p in out.sites if p.reason.startswith("backed off")}
    if final:  # the sites the kept graph leaves as they were (a later round may have given up instead)
        out.extra["backed_off"] = final
    return out


def _tp_group_sizes(ctx: TPContext) -> dict[str, int]:
    """{name: tp} of the TP group under both of its names (the model's all-reduces name either)."""
    return {name: ctx.tp for name in (ctx.tp_group.c10d_name, ctx.tp_group.vllm_name) if name}


def _slower(before: fx.Graph, after: fx.Graph, config: FxPassesConfig, ctx: TPContext, report: PassReport,
            token_range: tuple[int, int | None] | None) -> str | None:
    """`min_tokens: auto`: why the rewrite may not be kept for its modelled time over the token
    counts vLLM runs this graph at, or None (`fxpasses.token_gate`). Read off shapes and constants
    every rank shares, so every rank decides alike."""
    if config.min_tokens != "auto" or token_range is None or not config.family().bounded_by_original_bytes:
        return None
    verdict = token_gate.judge(before, after, token_range, ctx.tp, _tp_group_sizes(ctx),
                               link_costs.resolve(config.link_costs))
    report.extra["token_gate"] = verdict.to_dict()
    return None if verdict.keeps else verdict.why


def _nothing_to_do(config: FxPassesConfig, ctx: TPContext) -> str | None:
    if not config.strategies:
        return "no strategy enabled"
    return config.family().nothing_to_do(ctx)


def _nothing_owned(plans: list[SitePlan], config: FxPassesConfig, sites) -> str | None:
    """Why there is nothing to rewrite after planning (no owned site, no token count, min_tokens)."""
    if not any(p.strategy for p in plans):
        return "no site is owned by an enabled strategy" if sites else "the graph has no linear sites"
    T = config.family().token_count(plans)
    if T is None:
        return "no owned site has a TP all-reduce; nothing to rewrite"
    if config.min_tokens != "auto" and config.min_tokens and isinstance(T, int) and T < config.min_tokens:
        why = f"graph compiled for {T} tokens < min_tokens={config.min_tokens}"
        for p in plans:
            if p.strategy:
                p.skip(why)
        return why
    return None


def _rewrite(work: fx.Graph, plans: list[SitePlan], config: FxPassesConfig, ctx: TPContext) -> LayoutRewriter:
    """Every enabled strategy rewrites its sites (canonical order), then Shard0 is propagated."""
    family = config.family()
    enabled = [strategies.get(name) for name in config.strategies]  # resolved once, canonical order
    forms = {p.site.all_reduce.form for p in plans if p.site.all_reduce is not None}
    group, rank = family.rewriter_group(ctx, config)
    rw = LayoutRewriter(work, group, rank, CommBackend.for_forms(forms), family.token_count(plans), config)
    for node in family.rank_local_values(plans):
        rw.mark_rank_local(node)
    _hand_over_refused(plans, rw, ctx)
    for strategy in enabled:
        strategy.rewrite(rw, plans, ctx)
    rw.propagate()
    for strategy in enabled:
        strategy.after_propagation(rw, plans, ctx)
    work.eliminate_dead_code()
    return rw


def _kept(report: PassReport, reason: str, graph: fx.Graph, config: FxPassesConfig, tag: str | None) -> PassReport:
    """Nothing to rewrite after planning: the graph stays; a graph with sites still dumps its report
    (a graph without any has nothing to say, and would hide the rank's latest report)."""
    report.reason = reason
    if report.sites:
        dump.emit_abandoned(graph, report, config, tag or f"graph{next(_graph_ids)}")
    return _finish(report, reason)


def _abandon(e: Exception, graph: fx.Graph, report: PassReport, plans: list[SitePlan],
             config: FxPassesConfig, ctx: TPContext, opts: PassOptions) -> str:
    """Keep the original graph (or raise, see `_failed`); either way the dump directory gets the
    site report and the before-graph. A bytes refusal is the same on every rank (it is read off
    shapes every rank shares), so it never needs to fail loudly."""
    try:
        reason = _failed(e, plans, config, ctx, opts.fail_loudly and not isinstance(e, WireBytesError))
    except Exception as loud:
        report.reason = str(loud)
        raise
    else:
        report.reason = reason
        return reason
    finally:
        dump.emit_abandoned(graph, report, config, opts.tag or f"graph{next(_graph_ids)}")


def _hand_over_refused(plans: list[SitePlan], rw: LayoutRewriter, ctx: TPContext) -> None:
    """A site its owner refuses for a reason of its own goes to the next strategy that wants it."""
    for p in plans:
        while p.strategy and p.status is SiteStatus.PLANNED and p.fallbacks:
            why = strategies.get(p.strategy).precheck(p, rw, ctx)
            if why is None:
                break
            p.hand_over(why)


def _failed(e: Exception, plans: list[SitePlan], config: FxPassesConfig, ctx: TPContext,
            fail_loudly: bool) -> str:
    """The failure policy: the original graph stays; sites marked rewritten on the copy are skipped
    with the reason; `strict` re-raises, `fail_loudly` raises a RewriteError naming the rank.
    Returns the report's reason."""
    for p in plans:
        if p.status is SiteStatus.REWRITTEN:
            p.skip(f"graph kept unchanged: {e}")
    if fail_loudly and not config.strict:
        raise RewriteError(
            f"fxpasses: the rewrite failed on TP rank {ctx.rank} (global rank {ctx.global_rank}): "
            f"{type(e).__name__}: {e}. The other ranks may run the rewritten graph, so this rank cannot "
            "keep its original one. Exclude the sites involved (a pattern file's exclude prefixes) or "
            "disable the strategy, and report the failure") from e
    if isinstance(e, FxPassesError):
        if config.strict:
            raise e
        return f"rewrite abandoned, original graph kept: {e}"
    if config.strict:
        raise RewriteError(f"rewrite failed: {type(e).__name__}: {e}") from e
    log.error("fxpasses: rewrite failed; original graph kept", exc_info=e)
    return f"rewrite failed, original graph kept: {type(e).__name__}: {e}"


def _enforce_strict(plans: list[SitePlan], config: FxPassesConfig) -> None:
    skipped = [p for p in plans if p.status is SiteStatus.SKIPPED]
    if config.strict and skipped:
        raise RewriteError("strict mode: sites could not be rewritten: " +
                           "; ".join(f"{p.site.prefix}: {p.reason}" for p in skipped))


def _finish(report: PassReport, reason: str = "") -> PassReport:
    report.reason = reason or report.reason
    log.info("%s", report.to_text().splitlines()[0] + (f" | {report.diff}" if report.applied else ""))
    return report
