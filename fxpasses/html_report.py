"""`fxpasses report`: one self-contained HTML page (inline CSS and SVG, no script, nothing fetched)
from a pass run's dump folders (`fxpasses.dump.write_dumps`) and, optionally, a `fxpasses check
--json` result."""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fxpasses import advisor
from fxpasses import link_costs as lc
from fxpasses.errors import ConfigError


KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all")  # as fxpasses.report.KINDS
REPORT_SUFFIX = ".site_report.json"
LATEST = "site_report.json"  # a rank's latest graph (written again after the lowering)

# a graph line `name: "f32[s0, 8]" = torch.ops.ns.op.overload(...)`: its variable and call
_ASSIGN = re.compile(r'^\s*(\w+)(?::\s*"[^"]*")?\s*=\s*(.*)$')
_OP = re.compile(r"torch\.ops\.(\w+)\.(\w+)")
# ops a rewrite inserts (platform forms included); every fxpasses:: op counts as inserted too
_INSERTED_OP = re.compile(r"all_gather|reduce_scatter|all_to_all|maybe_pad_and_reduce")
_ALL_REDUCE_OP = re.compile(r"all_reduce|allreduce")

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1f2328}
h1{font-size:1.5em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top}th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.rewritten{color:#116329;font-weight:600}.skipped{color:#9a6700}.untouched{color:#57606a}
.ok{color:#116329;font-weight:600}.bad{color:#cf222e;font-weight:600}.muted{color:#57606a}
.sbs{display:grid;grid-template-columns:1fr 1fr;gap:8px}
pre{font:12px/1.35 ui-monospace,monospace;background:#f6f8fa;border:1px solid #ddd;padding:6px;
overflow:auto;max-height:40em;margin:0}
span.ins{background:#fde68a;font-weight:600}span.ar{background:#fee2e2}
svg text{font:12px sans-serif}rect.before{fill:#9ca3af}rect.after{fill:#2563eb}
polyline{fill:none;stroke-width:2}line.crossover{stroke:#cf222e;stroke-dasharray:4 3}line.axis{stroke:#57606a}
"""
#: line colours of a time chart's series, in order
SERIES_COLOURS = ("#9ca3af", "#2563eb", "#116329", "#9a6700", "#8250df", "#cf222e", "#0a7ea4")


@dataclass
class GraphDump:
    """One graph of one rank: its site report and the graph code before/after (None: not written)."""

    rank: int
    tag: str
    report: dict
    before: str | None
    after: str | None

    @property
    def anchor(self) -> str:
        return f"rank{self.rank}-{self.tag}"

    @property
    def label(self) -> str:
        return f"rank {self.rank} {self.tag}"


# ------------------------------------------------------------------------------------------------
# reading the inputs
# ------------------------------------------------------------------------------------------------
def natural_key(name: str) -> list:
    """graph2 before graph10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def rank_dirs(folder: Path) -> list[Path]:
    """rank<r> subfolders holding a site report, by rank."""
    if not folder.is_dir():
        return []
    dirs = [d for d in folder.iterdir() if d.is_dir() and re.fullmatch(r"rank\d+", d.name)
            and any(d.glob("*site_report.json"))]
    return sorted(dirs, key=lambda d: int(d.name[4:]))


def find_dump_dir(folder: Path) -> Path | None:
    """The folder with the rank* dumps: `folder` itself, or a check work folder's pass/dump."""
    for cand in (folder, folder / "pass" / "dump"):
        if rank_dirs(cand):
            return cand
    return None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e}); give a file fxpasses wrote "
                          "(a site report, or `fxpasses check --json FILE`)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a JSON {type(data).__name__}, not the object fxpasses writes")
    return data


def read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def graph_tags(rank_dir: Path) -> list[str]:
    """The graphs a rank's folder has a report of; only the latest (`site_report.json`) when no
    per-graph report exists."""
    tags = [f.name[:-len(REPORT_SUFFIX)] for f in rank_dir.glob("*" + REPORT_SUFFIX)]
    return sorted(tags, key=natural_key) or ["site_report"]


def load_rank(rank_dir: Path) -> list[GraphDump]:
    rank = int(rank_dir.name[4:])
    out = []
    for tag in graph_tags(rank_dir):
        rep = rank_dir / (LATEST if tag == "site_report" else tag + REPORT_SUFFIX)
        out.append(GraphDump(rank, tag, read_json(rep), read_text(rank_dir / f"{tag}.before.py"),
                             read_text(rank_dir / f"{tag}.after.py")))
    return out


def load_dumps(dump_dir: Path) -> list[GraphDump]:
    return [g for rd in rank_dirs(dump_dir) for g in load_rank(rd)]


def no_dumps_message(folder: Path) -> str:
    what = "has no dumps" if folder.is_dir() else "does not exist (or is no folder), so it has no dumps"
    return (f"{folder} {what}: no rank<r>/graph<N>.site_report.json under it or under its pass/dump. "
            "Point `fxpasses report` at a dump folder (`fxpasses dump --out DIR`, or the pass's dump_dir "
            "config key) or at a `fxpasses check --out DIR` work folder")


# ------------------------------------------------------------------------------------------------
# graph text: which lines call which collectives
# ------------------------------------------------------------------------------------------------
def called_op(line: str) -> tuple[str, str, str] | None:
    """(variable, namespace, op) of the torch op a graph-code line calls (the op inside an
    auto_functionalized), or None for comments and lines that call none."""
    if line.lstrip().startswith("#"):
        return None
    m = _ASSIGN.match(line)
    var, rhs = (m.group(1), m.group(2)) if m else ("", line)
    for ns, op in _OP.findall(rhs):
        if ns != "higher_order":
            return var, ns, op
    return None


def is_inserted_kind(ns: str, op: str) -> bool:
    return ns == "fxpasses" or bool(_INSERTED_OP.search(op))


def collective_vars(text: str) -> set[str]:
    """Variables of the lines calling an all-gather, reduce-scatter, all-to-all or fxpasses op."""
    return {c[0] for c in map(called_op, text.splitlines()) if c and c[0] and is_inserted_kind(c[1], c[2])}


def line_classes(text: str, before_vars: set[str] | None = None) -> list[str | None]:
    """Per line: "ar" for an all-reduce; for an after-graph (`before_vars`: the before-graph's
    `collective_vars`), "ins" for a collective the rewrite inserted; else None."""
    out = []
    for line in text.splitlines():
        c = called_op(line)
        if c and before_vars is not None and is_inserted_kind(c[1], c[2]) and c[0] not in before_vars:
            out.append("ins")
        elif c and _ALL_REDUCE_OP.search(c[2]):
            out.append("ar")
        else:
            out.append(None)
    return out


def render_code(text: str, classes: list[str | None], side: str, anchor: str) -> str:
    body = "".join(f'<span class="{c}">{esc(line)}\n</span>' if c else esc(line) + "\n"
                   for line, c in zip(text.splitlines(), classes))
    return f'<pre class="{side}" data-graph="{esc(anchor)}">{body}</pre>'


# ------------------------------------------------------------------------------------------------
# small HTML pieces
# ------------------------------------------------------------------------------------------------
class Markup(str):
    """HTML already escaped (a table cell that is not plain text)."""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def cell(value) -> str:
    return value if isinstance(value, Markup) else esc("-" if value is None or value == "" else value)


def table(headers: list[str] | None, rows: list[list], cls: str = "", anchor: str = "",
          numeric: tuple[int, ...] = ()) -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' data-graph="{esc(anchor)}"' if anchor else "")
    head = f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in headers)}</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{cell(v)}</td>' if i in numeric else f"<td>{cell(v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table{attrs}>{head}<tbody>{body}</tbody></table>"


def span(cls: str, text) -> Markup:
    return Markup(f'<span class="{esc(cls)}">{esc(text)}</span>')


def verdict(ok: bool | None, yes: str = "yes", no: str = "no") -> Markup:
    return span("muted", "-") if ok is None else span("ok", yes) if ok else span("bad", no)


def fmt_bytes(n) -> str:
    if n is None or not isinstance(n, (int, float)) or math.isnan(n):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_num(x, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return "nan" if math.isnan(x) else f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# the chart
# ------------------------------------------------------------------------------------------------
def bar_chart(rows: list[tuple[str, float, float]], title: str, kind: str = "bytes") -> str:
    """Horizontal bars in inline SVG: per row (label, before, after) one grey bar before and one
    blue bar after, on one scale. `kind`: the svg's class and the bars' first class ("bar" for the
    page's bytes chart, "lbar" for a graph's bytes per layer)."""
    bar = "bar" if kind == "bytes" else "lbar"
    label_w, bar_w, row_h, top = 230, 420, 30, 24
    top_val = max([v for _, b, a in rows for v in (b, a)] + [1])
    parts = [f'<text x="0" y="14">{esc(title)}</text>',
             f'<rect x="{label_w + bar_w - 170}" y="4" width="10" height="10" class="legend before"/>'
             f'<text x="{label_w + bar_w - 156}" y="14">before</text>'
             f'<rect x="{label_w + bar_w - 90}" y="4" width="10" height="10" class="legend after"/>'
             f'<text x="{label_w + bar_w - 76}" y="14">after</text>']
    for i, (label, before, after) in enumerate(rows):
        y = top + i * row_h
        parts.append(f'<text x="0" y="{y + 16}">{esc(label)}</text>')
        for j, (side, v) in enumerate((("before", before), ("after", after))):
            w = bar_w * v / top_val
            parts.append(f'<rect class="{bar} {side}" data-row="{esc(label)}" x="{label_w}" y="{y + j * 12}" '
                         f'width="{w:.1f}" height="11"><title>{esc(label)} {side}: {esc(fmt_bytes(v))}</title></rect>'
                         f'<text x="{label_w + w + 4:.1f}" y="{y + j * 12 + 10}">{esc(fmt_bytes(v))}</text>')
    height = top + len(rows) * row_h + 4
    return (f'<svg class="{kind}" width="{label_w + bar_w + 90}" height="{height}" role="img" '
            f'aria-label="{esc(title)}">{"".join(parts)}</svg>')


def crossover(base: list[tuple[int, float]], other: list[tuple[int, float]]) -> int | None:
    """The smallest token count from which `other` takes no more time than `base` at every larger
    count of the chart (None: never; the first count: everywhere)."""
    b = dict(base)
    pts = [(t, v) for t, v in other if t in b]
    for i, (t, _) in enumerate(pts):
        if all(v <= b[u] for u, v in pts[i:]):
            return t
    return None


def line_chart(series: dict[str, list[tuple[int, float]]], title: str, base: str) -> str:
    """Modelled time against token count in inline SVG (log2 token axis): one polyline per series
    (`data-series`), and per other series a dashed line at its crossover with `base` (`class=
    "crossover" data-series data-tokens`), from where it takes no more time than `base`."""
    left, width, top, height = 60, 440, 24, 200
    tokens = sorted({t for pts in series.values() for t, _ in pts})
    vals = [v for pts in series.values() for _, v in pts]
    if not tokens or not vals:
        return ""
    lo, hi = math.log2(tokens[0]), math.log2(tokens[-1])
    vmax = max(vals + [1e-9])

    def x(t):
        return left + (0 if hi == lo else width * (math.log2(t) - lo) / (hi - lo))

    def y(v):
        return top + height - height * v / vmax

    parts = [f'<text x="0" y="14">{esc(title)}</text>',
             f'<line class="axis" x1="{left}" y1="{top + height}" x2="{left + width}" y2="{top + height}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + height}"/>',
             f'<text x="0" y="{top + 10}">{esc(fmt_num(vmax))} us</text><text x="{left - 12}" y="{top + height}">0</text>']
    parts += [f'<text x="{x(t) - 8:.1f}" y="{top + height + 14}">{t}</text>' for t in (tokens[0], tokens[-1])]
    legend_y = top + height + 32
    for i, (name, pts) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in sorted(pts))
        parts.append(f'<polyline data-series="{esc(name)}" stroke="{colour}" points="{coords}">'
                     f'<title>{esc(name)}</title></polyline>')
        parts.append(f'<rect x="{left + 140 * (i % 3)}" y="{legend_y + 16 * (i // 3) - 9}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{left + 140 * (i % 3) + 14}" y="{legend_y + 16 * (i // 3)}">'
                     f'{esc(name)}</text>')
        if name != base and base in series:
            t = crossover(series[base], pts)
            if t is not None:
                parts.append(f'<line class="crossover" data-series="{esc(name)}" data-tokens="{t}" x1="{x(t):.1f}" '
                             f'y1="{top}" x2="{x(t):.1f}" y2="{top + height}" stroke="{colour}">'
                             f'<title>{esc(name)} takes no more time than {esc(base)} from {t} tokens</title></line>')
    rows = (len(series) + 2) // 3
    return (f'<svg class="time" width="{left + width + 40}" height="{legend_y + 16 * rows + 4}" role="img" '
            f'aria-label="{esc(title)}">{"".join(parts)}</svg>')


def advisor_series(model_dir: str | Path, tp: int, link_costs: dict | None,
                   tokens: tuple[int, ...] = tuple(2 ** i for i in range(13))) -> dict[str, list[tuple[int, float]]]:
    """fxpasses.advisor's modelled communication time per layer against token count, per strategy,
    for the checkpoint in `model_dir` (its config.json) at `tp`, with the run's link costs (else the
    platform's fixed ones); {} when the checkpoint or its shape cannot be read here."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        dims = advisor.dims_from_config(cfg)
        links = advisor.KindLinks(lc.from_report(link_costs) if link_costs else lc.resolve({"calibrate": False}))
        out: dict[str, list[tuple[int, float]]] = {}
        for t in tokens:
            for e in advisor.estimate(dims, tp, t, links, [1]):
                out.setdefault(e.strategy, []).append((t, e.comm_us_per_layer))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return {}
    return out


def layer_bytes_section(rep: dict) -> str:
    """Bytes each rank sends per step, per decoder layer ("pre" / "post": outside the layers),
    before and after the rewrite."""
    step = rep.get("bytes_per_step") or {}
    layers = step.get("layers") or {}
    if not layers:
        return ""
    rows = [((f"layer {k}" if str(k).isdigit() else str(k)), float(b), float(a)) for k, (b, a) in layers.items()]
    return (f"<details><summary>Bytes per layer (at {esc(step.get('tokens'))} tokens)</summary>"
            + bar_chart(rows, "bytes sent per step per rank, per layer", kind="layer-bytes") + "</details>")


def graph_bytes(g: GraphDump) -> tuple[float, float] | None:
    b = g.report.get("bytes_per_step") or {}
    if not isinstance(b.get("before"), (int, float)) or not isinstance(b.get("after"), (int, float)):
        return None
    return float(b["before"]), float(b["after"])


def bytes_section(graphs: list[GraphDump]) -> str:
    rows = [(g.label, *v) for g in graphs if (v := graph_bytes(g))]
    if not rows:
        return '<h2>Bytes per step</h2><p class="muted">No report carries bytes per step.</p>'
    tokens = sorted({str((g.report.get("bytes_per_step") or {}).get("tokens")) for g in graphs if graph_bytes(g)})
    return ("<h2>Bytes per step</h2><p>Bytes each rank sends per step, per graph (the reports carry totals "
            f"per graph; evaluated at {esc(', '.join(tokens))} tokens).</p>"
            + bar_chart(rows, "bytes sent per step per rank"))


# ------------------------------------------------------------------------------------------------
# one graph
# ------------------------------------------------------------------------------------------------
def collectives_table(rep: dict) -> str:
    before, after = rep.get("collectives_before") or {}, rep.get("collectives_after") or {}
    kinds = [k for k in KINDS if before.get(k) or after.get(k)] or list(KINDS)
    return table(["collective", "before", "after"], [[k, before.get(k, 0), after.get(k, 0)] for k in kinds],
                 cls="collectives", numeric=(1, 2))


def site_table(rep: dict, anchor: str) -> str:
    rows = [[s.get("prefix"), s.get("class"), s.get("strategy"), span(str(s.get("status")), s.get("status")),
             s.get("reason")] for s in rep.get("sites") or []]
    if not rows:
        return '<p class="muted">No sites.</p>'
    return table(["prefix", "layer class", "strategy", "status", "reason"], rows, cls="sites", anchor=anchor)


def graph_facts(rep: dict) -> str:
    mode = rep.get("graph_mode") or {}
    gate = rep.get("token_gate") or {}
    rows = [["applied", verdict(rep.get("applied"))], ["strategies", "+".join(rep.get("strategies") or [])],
            ["tp", rep.get("tp")], ["reason", rep.get("reason")],
            ["graph", f"{mode.get('kind', '-')}: {mode.get('why', '')}".strip(": ")]]
    if mode.get("boundaries"):
        rows.append(["piece boundaries", mode["boundaries"]])
    if gate.get("token_range"):
        rows.append(["compile range (tokens)", " .. ".join(str(x) for x in gate["token_range"])])
    b = rep.get("bytes_per_step") or {}
    if b:
        rows.append(["bytes per step", f"{fmt_bytes(b.get('before'))} -> {fmt_bytes(b.get('after'))} at "
                                       f"{b.get('tokens')} tokens (ratio {fmt_num(b.get('ratio'))})"])
    if b.get("grew"):
        rows.append(["layers sending more", "; ".join(f"{k}: {fmt_bytes(v[0])} -> {fmt_bytes(v[1])}"
                                                      for k, v in b["grew"].items())])
    rows += [[k.replace("_", " "), "; ".join(f"{p}: {why}" for p, why in rep[k].items())]
             for k in ("backed_off", "left_out") if rep.get(k)]
    rows += [["note", n] for n in rep.get("notes") or []]
    return table(None, rows, cls="facts")


def token_gate_section(gate: dict | None) -> str:
    if not gate:
        return ""
    points = table(["tokens", "comm before (us)", "comm after (us)", "delta (us)"],
                   [[p.get("tokens"), fmt_num(p.get("comm_before_us"), 6), fmt_num(p.get("comm_after_us"), 6),
                     fmt_num(p.get("delta_us"), 6)] for p in gate.get("points") or []],
                   cls="gate-points", numeric=(0, 1, 2, 3))
    costs = gate.get("link_costs") or {}
    links = table(["link", "latency (us)", "GB/s"],
                  [[k, fmt_num(v.get("latency_us")), fmt_num(v.get("gbps"))] for k, v in
                   (costs.get("links") or {}).items()], cls="link-costs", numeric=(1, 2))
    pts = [p for p in gate.get("points") or [] if isinstance(p.get("tokens"), int) and p["tokens"] > 0]
    chart = line_chart({"original graph": [(p["tokens"], p.get("comm_before_us") or 0.0) for p in pts],
                        "rewritten graph": [(p["tokens"], p.get("comm_after_us") or 0.0) for p in pts]},
                       "modelled communication time per step (us) against tokens", "original graph") if pts else ""
    return (f"<h4>Token gate (min_tokens: auto)</h4><p>Decision: "
            f"{verdict(gate.get('keeps'), 'keep the rewrite', 'keep the original graph')}"
            f"{' - ' + esc(gate['why']) if gate.get('why') else ''}</p>{points}{chart}"
            f"<p>Link costs: {esc(costs.get('platform', '-'))}, {esc(costs.get('source', ''))}; token-wise ops at "
            f"{esc(fmt_num(costs.get('memory_gbps')))} GB/s</p>{links}")


def lowering_section(rep: dict) -> str:
    rec = rep.get("lowering") or {}
    if not rec.get("backend"):
        return ""
    fused = ", ".join(f"{k} x{v}" for k, v in (rec.get("fused") or {}).items()) or "nothing fused"
    rows = [[s.get("prefix"), s.get("pair"), s.get("op") or "not fused", s.get("reason")] for s in rec.get("sites") or []]
    return (f"<h4>Lowering ({esc(rec['backend'])})</h4><p>{esc(fused)} {esc(rec.get('reason') or '')}</p>"
            + table(["prefix", "pair", "fused op", "reason"], rows, cls="lowering"))


def code_section(g: GraphDump) -> str:
    if g.before is None and g.after is None:
        return ""
    before = g.before or ""
    left = render_code(before, line_classes(before), "before", g.anchor)
    classes = line_classes(g.after, collective_vars(before)) if g.after is not None else []
    right = (render_code(g.after, classes, "after", g.anchor) if g.after is not None else
             '<pre class="after missing">no after-graph: nothing was rewritten, the graph was kept</pre>')
    n = classes.count("ins")
    return (f"<details><summary>Graph code before | after ({n} inserted collective lines highlighted)</summary>"
            f'<div class="sbs"><div><h4>before</h4>{left}</div><div><h4>after</h4>{right}</div></div></details>')


def graph_section(g: GraphDump) -> str:
    rep = g.report
    return (f'<section id="{esc(g.anchor)}"><h3>{esc(g.label)}: {esc(rep.get("diff") or rep.get("reason") or "")}'
            f"</h3>{graph_facts(rep)}{collectives_table(rep)}{layer_bytes_section(rep)}"
            f"{token_gate_section(rep.get('token_gate'))}"
            f"{site_table(rep, g.anchor)}{lowering_section(rep)}{code_section(g)}</section>")


def lowered_section(dump_dir: Path, rank: int) -> str:
    """A rank's lowered graph (`lowered.after.py`, written when the lowering fused pairs)."""
    text = read_text(dump_dir / f"rank{rank}" / "lowered.after.py")
    if text is None:
        return ""
    anchor = f"rank{rank}-lowered"
    classes = line_classes(text, set())
    return (f'<section id="{anchor}"><h3>rank {rank}: lowered graph</h3><details><summary>code ({classes.count("ins")} '
            f'collective lines highlighted)</summary>{render_code(text, classes, "lowered", anchor)}</details></section>')


# ------------------------------------------------------------------------------------------------
# the check result
# ------------------------------------------------------------------------------------------------
def bench_table(bench: dict) -> str:
    rows = [[name, fmt_num((w.get("baseline") or {}).get("tok_s")), fmt_num((w.get("pass") or {}).get("tok_s")),
             fmt_num(w.get("ratio")), w.get("rounds")]
            for name, w in bench.items() if isinstance(w, dict)]
    return table(["workload", "tokens/s without", "tokens/s with the pass", "ratio", "rounds"], rows,
                 cls="bench", numeric=(1, 2, 3, 4)) if rows else ""


def advisor_section(check: dict, link_costs: dict | None) -> str:
    """The advisor's modelled time per layer against tokens for every strategy, on the checked
    checkpoint at its TP size, with each strategy's crossover with vanilla TP marked."""
    series = advisor_series(check.get("model") or "", int(check.get("tp") or 2), link_costs)
    if "vanilla" not in series:
        return ""
    where = "the link costs the pass decided with" if link_costs else "the platform's fixed link costs"
    return ("<h3>Modelled time against tokens (fxpasses.advisor)</h3><p>Communication time per decoder layer "
            f"and rank, per strategy, with {where}; a dashed line marks where a strategy starts taking no more "
            "time than vanilla TP (a model estimate, not a measurement: the bench rows above are).</p>"
            + line_chart(series, "modelled communication time per layer (us) against tokens", "vanilla"))


def check_section(check: dict, link_costs: dict | None = None) -> str:
    diff, tol = check.get("max_logprob_diff"), check.get("tolerance")
    rows = [["verdict", check.get("message")], ["exit code", check.get("exit_code")],
            ["model", check.get("model")], ["tp", check.get("tp")], ["strategies", "+".join(check.get("strategies") or [])],
            ["dtype / kernels", f"{check.get('dtype', '-')} / {check.get('cpu', '-')}"],
            ["tokens equal", verdict(check.get("tokens_equal"))],
            ["outputs equal (near-ties allowed)", verdict(check.get("outputs_equal"))],
            ["max |logprob difference|", f"{fmt_num(diff)} (tolerance {fmt_num(tol)})"],
            ["first divergence", check.get("first_divergence")],
            ["sites rewritten (rank 0)", check.get("rewritten")], ["ranks applied", check.get("applied_ranks")],
            ["compile s (without / with)", " / ".join(fmt_num(v) for v in (check.get("compile_s") or {}).values())]]
    rows += [["near tie", t] for t in check.get("near_ties") or []]
    before, after = check.get("bytes_before") or {}, check.get("bytes_after") or {}
    chart = bar_chart([(f"T={t}", float(before[t]), float(after.get(t, 0))) for t in before],
                      "bytes rank 0 sends per step") if before else ""
    return ("<h2>Check (vLLM engine without and with the pass)</h2>" + table(None, rows, cls="check")
            + bench_table(check.get("bench") or {}) + chart + advisor_section(check, link_costs))


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------
def summary_section(graphs: list[GraphDump], dump_dir: Path) -> str:
    rows = [[Markup(f'<a href="#{esc(g.anchor)}">{esc(g.label)}</a>'), verdict(g.report.get("applied")),
             (g.report.get("graph_mode") or {}).get("kind"), g.report.get("diff") or g.report.get("reason"),
             sum(s.get("status") == "rewritten" for s in g.report.get("sites") or []), len(g.report.get("sites") or [])]
            for g in graphs]
    ranks = sorted({g.rank for g in graphs})
    return (f"<p>Dumps: {esc(dump_dir)} ({len(ranks)} ranks, {len(graphs)} graph reports)</p>"
            + table(["graph", "applied", "graph kind", "collectives / reason", "sites rewritten", "sites"], rows,
                    cls="summary", numeric=(4, 5)))


def render_page(graphs: list[GraphDump], dump_dir: Path, check: dict | None) -> str:
    parts = [summary_section(graphs, dump_dir)]
    if check:
        gates = [g.report.get("token_gate") for g in graphs if isinstance(g.report.get("token_gate"), dict)]
        costs = next((gt.get("link_costs") for gt in gates if gt.get("link_costs")), None)
        parts.append(check_section(check, costs))
    parts.append(bytes_section(graphs))
    for rank in sorted({g.rank for g in graphs}):
        parts.append(f"<h2>Rank {rank}</h2>")
        parts += [graph_section(g) for g in graphs if g.rank == rank]
        parts.append(lowered_section(dump_dir, rank))
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fxpasses report</title>'
            f"<style>{CSS}</style></head><body><h1>fxpasses report</h1>{''.join(parts)}</body></html>\n")


def write_report(folder: str | Path, out: str | Path | None = None, check_json: str | Path | None = None,
                 check: dict | None = None) -> Path:
    """Write the page for the dumps under `folder` (default `folder`/report.html), with a check
    result (`check`, or read from `check_json`); ConfigError when `folder` has no dumps or a file
    cannot be read."""
    folder = Path(folder)
    dump_dir = find_dump_dir(folder)
    if dump_dir is None:
        raise ConfigError(no_dumps_message(folder))
    if check_json:
        check = read_json(Path(check_json))
    page = render_page(load_dumps(dump_dir), dump_dir, check)
    target = Path(out) if out else folder / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="one self-contained HTML page of a pass run's dumps (and a check result)",
                       description="Writes one HTML file (inline CSS and SVG, nothing fetched) from a dump folder "
                                   "(rank*/graph*.site_report.json) or a `fxpasses check` work folder. Exit status: "
                                   "0 written, 2 no dumps or an unreadable file.")
    r.add_argument("dir", help="a dump folder (rank*/ subfolders) or a `fxpasses check --out` work folder")
    r.add_argument("--out", default=None, help="the HTML file to write (default DIR/report.html)")
    r.add_argument("--check-json", default=None, metavar="FILE",
                   help="a `fxpasses check --json` result to include (tokens, logprobs, bench ratios)")


def main(args) -> int:
    path = write_report(args.dir, args.out, args.check_json)
    print(f"fxpasses: report written to {path}")
    return 0
