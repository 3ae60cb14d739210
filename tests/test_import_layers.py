"""No import cycles: the module-level imports of the package form a DAG (so no import order can
hit a half-initialised module), and every entry module imports first in a fresh interpreter."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import run_python_together

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "fxpasses"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_level_imports() -> dict[str, set[str]]:
    """{module: fxpasses modules it imports at module level} (imports inside functions and under
    TYPE_CHECKING are not executed at import time and do not count)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_module_level_imports_form_a_dag():
    graph = module_level_imports()
    assert len(graph) > 20
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


ENTRY_MODULES = ["fxpasses.config", "fxpasses.strategies.base", "fxpasses.strategies.mlp_tp", "fxpasses.plan",
                 "fxpasses.pipeline", "fxpasses.vllm_pass", "fxpasses.plugin", "fxpasses.cli"]


def test_entry_modules_import_first_in_a_fresh_interpreter():
    """Each entry module imported first in an interpreter of its own, then the strategy registry
    asked: no import order hides a cycle. Two interpreters at a time (this machine kind has 2 cores)."""
    code = "import {m}; import fxpasses.strategies.base as b; assert b.registered_names()"
    runs = run_python_together([["-c", code.format(m=m)] for m in ENTRY_MODULES], cwd=REPO)
    bad = [(m, err[-800:]) for m, (rc, err) in zip(ENTRY_MODULES, runs) if rc]
    assert bad == [], bad
