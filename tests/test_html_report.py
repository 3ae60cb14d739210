"""`fxpasses report`: the HTML page of real dumps. The dumps are written by the pipeline itself
(`run_passes` with a `dump_dir`) on synthetic post-grad graphs at TP=2, rank 0, in this process:
FlashComm1 rewritten, FlashComm2 rewritten, and FlashComm1 kept by the token gate (no after-graph)."""
from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser

import pytest
from torch._dispatch.python import enable_python_dispatcher

from fxpasses import graph_forms as gf
from fxpasses.commands.check import CheckResult
from fxpasses.cli import main
from fxpasses.config import FxPassesConfig
from fxpasses.commands.engine_bench import summarise
from fxpasses.pipeline import run_passes
from fxpasses.testing.synthetic_graphs import ModelShape, build_graph, tp_context

LLAMA = ModelShape("tiny", 2, 256, 4, 2, 64, 512, 1000)
RUNS = {  # tag: (strategies, config keys, token range)
    "graph0": (("flashcomm1",), {}, None),
    "graph1": (("flashcomm2",), {}, None),
    "graph2": (("flashcomm1",), {"min_tokens": "auto"}, (1, 4096)),
}
INSERTED_KINDS = {"all_gather", "reduce_scatter", "all_to_all"}


def inserted_nodes(graph) -> set[str]:
    """Names of the nodes of `graph` that are all-gathers, reduce-scatters, all-to-alls or fxpasses ops."""
    return {n.name for n in graph.nodes if n.op == "call_function" and (
        gf.collective_kind(n) in INSERTED_KINDS or getattr(n.target, "namespace", None) == "fxpasses")}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """(dump folder, {tag: names of the inserted collective nodes in the graph as rewritten})."""
    out = tmp_path_factory.mktemp("dumps")
    inserted = {}
    with enable_python_dispatcher():
        for tag, (strategies, keys, token_range) in RUNS.items():
            gm = build_graph(LLAMA, 2)
            assert not inserted_nodes(gm.graph)  # the original graph has all-reduces only
            rep = run_passes(gm.graph, FxPassesConfig(strategies=strategies, dump_dir=str(out), **keys),
                             tp_context(2), tag=tag, token_range=token_range)
            assert rep.applied is (tag != "graph2"), rep.reason
            inserted[tag] = inserted_nodes(gm.graph)
    return out, inserted


class Page(HTMLParser):
    """What the tests read off the page: every start tag, the site tables' first column, the bars,
    the highlighted lines of each after-graph, the text of each element with an id."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.site_prefixes, self.bars, self.ins, self.ids = [], {}, [], {}, set()
        self.before_ins = 0  # highlighted lines in before-graphs
        self._table = self._pre = None
        self._cell = self._span = None
        self._col = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = (a.get("class") or "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table" and "sites" in cls:
            self._table = self.site_prefixes.setdefault(a["data-graph"], [])
        elif tag == "tr":
            self._col = 0
        elif tag == "td" and self._table is not None:
            self._cell = [] if self._col == 0 else None
            self._col += 1
        elif tag == "rect" and "bar" in cls:
            self.bars.append((cls[1], a["data-row"], float(a["width"])))
        elif tag == "pre" and "after" in cls and "data-graph" in a:
            self._pre = self.ins.setdefault(a["data-graph"], [])
        elif tag == "pre" and "before" in cls:
            self._pre = False
        elif tag == "span" and self._pre is not None and "ins" in cls:
            if self._pre is False:
                self.before_ins += 1
            else:
                self._span = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "span" and self._span is not None:
            self._pre.append("".join(self._span))
            self._span = None
        elif tag == "pre":
            self._pre = None

    def handle_data(self, data):
        for buf in (self._cell, self._span):
            if buf is not None:
                buf.append(data)


@pytest.fixture(scope="module")
def page(dumps, tmp_path_factory):
    folder, _ = dumps
    out = tmp_path_factory.mktemp("page") / "r.html"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    return text, Page(text)


def reports(folder) -> dict[str, dict]:
    return {tag: json.loads((folder / "rank0" / f"{tag}.site_report.json").read_text()) for tag in RUNS}


def test_every_site_of_every_report_is_in_its_site_table(dumps, page):
    folder, _ = dumps
    _, p = page
    for tag, rep in reports(folder).items():
        prefixes = [s["prefix"] for s in rep["sites"]]
        assert prefixes and p.site_prefixes[f"rank0-{tag}"] == prefixes, tag


def test_bytes_chart_has_one_bar_pair_per_graph_on_one_scale(dumps, page):
    folder, _ = dumps
    text, p = page
    assert text.count("<svg class=\"bytes\"") == 1 and text.count("<svg class=\"time\"") == 1  # + graph2's gate
    reps = reports(folder)
    labels = [f"rank 0 {tag}" for tag in RUNS]
    assert [row for side, row, _ in p.bars if side == "before"] == labels
    assert [row for side, row, _ in p.bars if side == "after"] == labels
    width = {(side, row): w for side, row, w in p.bars}
    top = max(max(r["bytes_per_step"]["before"], r["bytes_per_step"]["after"]) for r in reps.values())
    for tag, rep in reps.items():
        for side in ("before", "after"):
            want = 420 * rep["bytes_per_step"][side] / top
            assert abs(width[(side, f"rank 0 {tag}")] - want) < 0.1, (tag, side)


def test_the_page_fetches_nothing(page):
    text, p = page
    assert not re.search(r"https?://", text)
    assert not re.search(r"url\(|@import", text)
    assert {t for t, _ in p.tags}.isdisjoint({"script", "link", "img", "iframe", "object", "embed", "base"})
    for tag, attrs in p.tags:
        assert "src" not in attrs, tag
        href = attrs.get("href")
        assert href is None or (href.startswith("#") and href[1:] in p.ids), href


def test_highlighted_lines_are_exactly_the_inserted_collectives(dumps, page):
    _, inserted = dumps
    _, p = page
    assert inserted["graph0"] and inserted["graph1"] and not inserted["graph2"]
    for tag, names in inserted.items():
        lines = p.ins.get(f"rank0-{tag}", [])
        assert {line.split(":")[0].split("=")[0].strip() for line in lines} == names, tag
        assert len(lines) == len(names), tag
    # the kept graph has no after-graph in its dump: nothing highlighted; before-graphs never are
    assert "rank0-graph2" not in p.ins
    assert p.before_ins == 0 and p.tags.count(("pre", {"class": "before", "data-graph": "rank0-graph2"})) == 1


def test_token_gate_decision_compile_range_and_link_costs(page):
    text, _ = page
    section = text[text.index('id="rank0-graph2"'):]
    assert "keep the original graph" in section and "compile range (tokens)</td><td>1 .. 4096" in section
    links = section[section.index('class="link-costs"'):section.index("</table>", section.index('class="link-costs"'))]
    assert all(f"<td>{k}</td>" in links for k in ("all_reduce", "reduce_scatter", "all_gather", "all_to_all"))


def test_check_result_and_work_folder(dumps, tmp_path):
    folder, _ = dumps
    work = tmp_path / "work"
    shutil.copytree(folder, work / "pass" / "dump")
    bench = summarise([{"baseline": {"prefill": {"s": 0.6}, "decode": {"s": 1.2}},
                        "pass": {"prefill": {"s": 0.5}, "decode": {"s": 1.5}}}])
    res = CheckResult(exit_code=0, model="tiny", tp=2, strategies=["flashcomm1"], tokens_equal=True,
                      max_logprob_diff=3.25e-7, tolerance=1e-3, outputs_equal=True, bench=bench,
                      bytes_before={256: 4_000_000}, bytes_after={256: 2_000_000})
    check = tmp_path / "check.json"
    check.write_text(json.dumps(res.to_dict()))
    assert main(["report", str(work), "--check-json", str(check)]) == 0
    text = (work / "report.html").read_text()
    p = Page(text)
    assert p.site_prefixes.keys() == {f"rank0-{t}" for t in RUNS}
    assert "tokens equal</td><td><span class=\"ok\">yes" in text and "3.25e-07 (tolerance 0.001)" in text
    for kind in ("prefill", "decode"):
        assert f"<td>{kind}</td>" in text and f'<td class="num">{bench[kind]["ratio"]:.4g}</td>' in text
    assert ("after", "T=256", 210.0) in p.bars  # half the bytes: half the bar of the scale's 420


def test_exit_2_and_the_fix_when_the_folder_has_no_dumps(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} has no dumps" in err and "fxpasses check --out DIR" in err and "dump_dir" in err
    assert not (tmp_path / "report.html").exists()


def test_out_is_respected_and_the_default_is_dir_report_html(dumps, tmp_path):
    folder, _ = dumps
    out = tmp_path / "sub" / "page.html"
    kept = folder / "report.html"
    (tmp_path / "pass_page.html").write_bytes(kept.read_bytes())  # the pass's own page, put back below
    kept.write_text("the page before")
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert out.is_file() and kept.read_text() == "the page before"
    assert main(["report", str(folder)]) == 0
    assert kept.read_text() == out.read_text()
    kept.write_bytes((tmp_path / "pass_page.html").read_bytes())


def _polylines(text: str) -> dict[str, list[tuple[float, float]]]:
    p = Page(text)
    return {a["data-series"]: [tuple(map(float, xy.split(","))) for xy in a["points"].split()]
            for tag, a in p.tags if tag == "polyline"}


def _crossovers(text: str) -> dict[str, int]:
    return {a["data-series"]: int(a["data-tokens"]) for tag, a in Page(text).tags
            if tag == "line" and "crossover" in (a.get("class") or "")}


def _first_from_which(base: dict[int, float], other: dict[int, float]) -> int | None:
    """By hand: the smallest token count t with other <= base at t and every larger count."""
    ts = sorted(other)
    return next((t for t in ts if all(other[u] <= base[u] for u in ts if u >= t)), None)


def test_token_gate_chart_draws_both_graphs_and_marks_no_crossover_when_the_rewrite_never_pays(dumps, page):
    """graph2's gate kept the original graph: the chart has its modelled points, both lines, and no
    crossover unless the rewritten graph is cheaper from some count on (as computed here by hand)."""
    folder, _ = dumps
    gate = reports(folder)["graph2"]["token_gate"]
    text, _ = page
    section = text[text.index('id="rank0-graph2"'):]
    section = section[:section.index("</section>")]
    lines = _polylines(section)
    assert set(lines) == {"original graph", "rewritten graph"}
    assert len(lines["original graph"]) == len(lines["rewritten graph"]) == len(gate["points"]) >= 2
    before = {p["tokens"]: p["comm_before_us"] for p in gate["points"]}
    after = {p["tokens"]: p["comm_after_us"] for p in gate["points"]}
    want = _first_from_which(before, after)
    assert _crossovers(section) == ({} if want is None else {"rewritten graph": want})
    assert want is None  # the gate kept the original graph over the whole range


def test_check_page_charts_the_advisor_with_each_strategys_crossover(dumps, tmp_path):
    """The checked checkpoint's config.json at its TP: one line per advisor strategy, each
    crossover with vanilla where a by-hand scan of advisor.estimate puts it."""
    from fxpasses import advisor, link_costs
    from fxpasses.html_report import advisor_series

    folder, _ = dumps
    work = tmp_path / "work"
    shutil.copytree(folder, work / "pass" / "dump")
    model = tmp_path / "ckpt"
    model.mkdir()
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 2, "vocab_size": 32000, "torch_dtype": "bfloat16"}
    (model / "config.json").write_text(json.dumps(cfg))
    res = CheckResult(exit_code=0, model=str(model), tp=4, strategies=["flashcomm1"], tokens_equal=True,
                      max_logprob_diff=0.0, tolerance=1e-3, outputs_equal=True)
    check = tmp_path / "check.json"
    check.write_text(json.dumps(res.to_dict()))
    assert main(["report", str(work), "--check-json", str(check)]) == 0
    text = (work / "report.html").read_text()
    section = text[text.index("Modelled time against tokens"):]
    lines = _polylines(section[:section.index("</svg>")])
    gate_costs = reports(folder)["graph2"]["token_gate"]["link_costs"]
    links = advisor.KindLinks(link_costs.from_report(gate_costs))
    dims = advisor.dims_from_config(cfg)
    grid = [2 ** i for i in range(13)]
    by_hand = {}
    for t in grid:
        for e in advisor.estimate(dims, 4, t, links, [1]):
            by_hand.setdefault(e.strategy, {})[t] = e.comm_us_per_layer
    assert set(lines) == set(by_hand) and "vanilla" in lines and "flashcomm1" in lines
    assert all(len(pts) == len(grid) for pts in lines.values())
    want = {s: t for s, vals in by_hand.items() if s != "vanilla"
            and (t := _first_from_which(by_hand["vanilla"], vals)) is not None}
    assert want and _crossovers(section[:section.index("</svg>")]) == want  # FlashComm2 pays from some count
    assert advisor_series(tmp_path / "nowhere", 4, None) == {}  # no checkpoint here: no chart, no error


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0")


def test_the_page_renders_in_headless_chromium(page, tmp_path):
    """Debian's Chromium (installed by tools/test.sh for the second tier) renders the page: a
    screenshot that is not blank, the DOM it built holds every site table and both charts, and its
    log has no script error or blocked load."""
    import subprocess

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: tools/test.sh installs Debian's package (apt-get install chromium)"
    text, p = page
    html_file = tmp_path / "report.html"
    html_file.write_text(text)
    shot = tmp_path / "shot.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    r = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", html_file.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    pixels = list(img.getdata())
    not_white = sum(1 for px in pixels if px != (255, 255, 255)) / len(pixels)
    assert not_white > 0.02 and len(set(pixels)) > 20, (not_white, len(set(pixels)))
    errors = [line for line in r.stderr.splitlines()
              if re.search(r"Uncaught|CONSOLE\(\d+\).*[Ee]rror|net::ERR_|Refused to", line)]
    assert not errors, errors
    dom = subprocess.run([*common, "--dump-dom", html_file.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="sites"') == len(p.site_prefixes) == len(RUNS)
    assert '<svg class="bytes"' in dom.stdout and '<svg class="time"' in dom.stdout


def test_bytes_per_layer_add_up_and_are_drawn_per_graph(dumps, page):
    """Each report's bytes per layer sum to its per-step totals, and its section draws one bar pair
    per layer on that graph's own scale."""
    folder, _ = dumps
    text, _ = page
    for tag, rep in reports(folder).items():
        step = rep["bytes_per_step"]
        layers = step["layers"]
        assert {"0", "1"} <= set(layers)
        assert sum(b for b, _ in layers.values()) == pytest.approx(step["before"])
        assert sum(a for _, a in layers.values()) == pytest.approx(step["after"])
        section = text[text.index(f'id="rank0-{tag}"'):]
        section = section[:section.index("</section>")]
        bars = [(a["class"].split()[1], a["data-row"], float(a["width"])) for t, a in Page(section).tags
                if t == "rect" and (a.get("class") or "").startswith("lbar ")]
        labels = [f"layer {k}" if k.isdigit() else k for k in layers]
        assert [r for side, r, _ in bars if side == "before"] == labels
        top = max(max(b, a) for b, a in layers.values())
        for (side, row, w) in bars:
            b, a = layers[row.removeprefix("layer ")]
            assert w == pytest.approx(420 * (b if side == "before" else a) / top, abs=0.1)


def test_the_pass_keeps_a_page_in_its_dump_dir(dumps):
    """The vLLM pass's dump directory gets its page from the pass itself, with every graph dumped."""
    folder, _ = dumps
    page = Page((folder / "report.html").read_text())
    assert page.site_prefixes.keys() == {f"rank0-{t}" for t in RUNS}
    assert not list(folder.glob(".report.html.*"))  # written atomically, nothing left behind
