"""No import cycles: the module-level imports of the package form a DAG (so no import order can
hit a half-initialised module), and every entry module imports first in a fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for m in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}; import fxpasses.strategies.base as b; '\n"
            "                        f'assert b.registered_names()'], capture_output=True, text=True)\n"
            "    if r.returncode: bad.append((m, r.stderr[-800:]))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code, *ENTRY_MODULES], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
