"""The strategy registry is the one list of strategies: config parsing, pattern loading, planning
and the pipeline read it. A strategy defined here, in a test module, runs through the pipeline with
no edit to the core."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch._dispatch.python import enable_python_dispatcher

from fxpasses import graph_forms as gf
from fxpasses.config import FxPassesConfig, parse_strategies
from fxpasses.errors import ConfigError
from fxpasses.patterns_loader import parse_pattern_dict
from fxpasses.pipeline import run_passes
from fxpasses.report import collective_counts
from fxpasses.site_records import SiteStatus
from fxpasses.strategies import interface, registry
from fxpasses.testing.synthetic_graphs import ModelShape, build_graph, tp_context

TINY = ModelShape("tiny", 2, 256, 4, 2, 64, 512, 1000)


# The worked example of docs/add-a-strategy.md is this module's toy: its code blocks are run here, so
# the page cannot drift from what the pass accepts.
DOC = Path(__file__).resolve().parents[1] / "docs" / "add-a-strategy.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def _run_doc_block(i: int, namespace: dict) -> dict:
    exec(compile(BLOCKS[i], f"{DOC}, code block {i + 1}", "exec"), namespace)
    return namespace


ScatterRows = _run_doc_block(0, {})["ScatterRows"]


@pytest.fixture
def toy():
    s = registry.register(ScatterRows())
    yield s
    registry.unregister(s.name)


def test_builtin_strategies_come_from_their_modules():
    names = registry.registered_names()
    assert names[:4] == ["flashcomm1", "flashcomm2", "otp", "mlp_tp"]  # ascending precedence
    assert registry.get("sp").name == "flashcomm1" and registry.get("fc2").name == "flashcomm2"
    assert [s.name for s in registry.by_precedence("row", set(names))][:4] == ["mlp_tp", "otp", "flashcomm2", "flashcomm1"]
    assert [s.name for s in registry.by_precedence("column", set(names))] == ["mlp_tp", "flashcomm1"]


def test_the_documented_example_is_parsed_planned_and_rewritten_without_core_edits():
    """docs/add-a-strategy.md's second block registers the toy and runs the pass, as written."""
    assert len(BLOCKS) == 2
    with enable_python_dispatcher():
        gm = build_graph(TINY, 4)
        before = collective_counts(gm.graph)
        ns = {"ScatterRows": ScatterRows, "graph": gm.graph, "ctx": tp_context(4)}
        try:
            rep = _run_doc_block(1, ns)["report"]
            assert parse_strategies("toy") == ("toy_scatter_oproj",)
        finally:
            registry.unregister("toy_scatter_oproj")
    assert rep.applied, rep.reason
    mine = [p for p in rep.sites if p.strategy == "toy_scatter_oproj"]
    assert [p.site.prefix.rsplit(".", 1)[-1] for p in mine] == ["embed_tokens"] + ["o_proj", "down_proj"] * TINY.layers
    assert all(p.status is SiteStatus.REWRITTEN for p in mine)
    others = [p for p in rep.sites if p.strategy != "toy_scatter_oproj"]
    assert others and all(p.status is SiteStatus.UNTOUCHED for p in others)
    after = collective_counts(gm.graph)
    assert after["reduce_scatter"] == before["all_reduce"] == 1 + 2 * TINY.layers
    assert after["all_reduce"] == 0
    # the sharded stream is all-gathered wherever a consumer needs every token
    assert after["all_gather"] >= 1
    assert not any(gf.collective_kind(n) == "all_reduce" for n in gm.graph.nodes)


def test_the_toy_loses_to_a_higher_precedence_strategy(toy):
    cfg = FxPassesConfig(strategies=("toy", "flashcomm1"))
    assert cfg.strategies == ("toy_scatter_oproj", "flashcomm1")
    with enable_python_dispatcher():
        rep = run_passes(build_graph(TINY, 4).graph, cfg, tp_context(4))
    assert rep.applied, rep.reason
    assert not [p for p in rep.sites if p.strategy == "toy_scatter_oproj"]


def test_pattern_files_may_name_registered_strategies_only(toy):
    ps = parse_pattern_dict({"classes": {"row": ["RowParallelLinear"]}, "toy_scatter_oproj": {"row": ["dense"]}},
                            "test")
    assert ps.for_strategy(toy).row == ["dense"]
    registry.unregister(toy.name)
    with pytest.raises(Exception, match="unknown key"):
        parse_pattern_dict({"classes": {}, "toy_scatter_oproj": {"row": ["dense"]}}, "test")
    registry.register(toy)


def test_registration_refuses_clashing_aliases_and_unknown_kinds(toy):
    class Clash(ScatterRows):
        name = "other"
        aliases = ("toy",)

    class BadKind(ScatterRows):
        name = "bad"
        aliases = ()
        site_kinds = frozenset({"rows"})

    with pytest.raises(ConfigError, match="alias 'toy' already names"):
        registry.register(Clash())
    with pytest.raises(ConfigError, match="unknown site kind"):
        registry.register(BadKind())

    class NoFamily(interface.Strategy):
        name = "no_family"
        site_kinds = frozenset({"row"})

    with pytest.raises(ConfigError, match="set `family`"):
        registry.register(NoFamily())
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        FxPassesConfig(strategies=("nope",))
