"""No import cycles at any level: every fxpasses import (module-level, inside a function, under
TYPE_CHECKING) forms a DAG, lazy imports are the deliberate few, and every entry module imports
first in a fresh interpreter."""
from __future__ import annotations

import sys
from pathlib import Path

from helpers import run_python_together

REPO = Path(__file__).resolve().parents[1]


# the package's shape is measured by tools/arch_metrics.py; the test reads the import graph the same way
sys.path.insert(0, str(REPO / "tools"))
import arch_metrics  # noqa: E402

# The only modules that import fxpasses modules inside functions (or under TYPE_CHECKING), and why.
# Everywhere else an import is a module-level edge of the graph below.
DELIBERATE_LAZY = {
    "fxpasses": "package face: `fxpasses.vllm_pass_instance` on first use, without importing vLLM",
    "fxpasses.plugin": "vLLM plugin: loaded in every vLLM process; imports the pass when vLLM registers it",
    "fxpasses.vllm_pass": "vLLM adapter: the pipeline and the lowering load when a graph is compiled",
    "fxpasses.strategies.registry": "plugin discovery: imports the strategy modules it registers",
    "fxpasses.cli": "CLI: a subcommand imports what it runs",
    "fxpasses.commands.check": "CLI command: vLLM-facing parts load when the check runs",
}


def test_no_import_cycle_at_any_level():
    """Module-level, function-level and TYPE_CHECKING imports together form a DAG: no import order
    can hit a half-initialised module, and no module reaches back up into a layer above it."""
    graph = arch_metrics.imports(arch_metrics.package_modules(include_testing=True))
    assert len(graph) > 40
    assert arch_metrics.cycles(graph) == []


def test_lazy_imports_are_deliberate():
    lazy = arch_metrics.imports(arch_metrics.package_modules(), lazy_only=True)
    stray = {m: sorted(d) for m, d in lazy.items() if d and m not in DELIBERATE_LAZY}
    assert stray == {}, f"function-level fxpasses imports outside {sorted(DELIBERATE_LAZY)}: {stray}"


def test_a_cycle_is_caught():
    """The cycle finder is not vacuous: an edge back up from the bottom of the graph is a cycle."""
    graph = arch_metrics.imports(arch_metrics.package_modules())
    graph["fxpasses.errors"] = graph["fxpasses.errors"] | {"fxpasses.pipeline"}
    assert any("fxpasses.errors" in c and "fxpasses.pipeline" in c for c in arch_metrics.cycles(graph))


ENTRY_MODULES = ["fxpasses.config", "fxpasses.strategies.registry", "fxpasses.strategies.mlp_tp", "fxpasses.plan",
                 "fxpasses.pipeline", "fxpasses.vllm_pass", "fxpasses.plugin", "fxpasses.cli"]


def test_entry_modules_import_first_in_a_fresh_interpreter():
    """Each entry module imported first in an interpreter of its own, then the strategy registry
    asked: no import order hides a cycle. Two interpreters at a time (this machine kind has 2 cores)."""
    code = "import {m}; import fxpasses.strategies.registry as b; assert b.registered_names()"
    runs = run_python_together([["-c", code.format(m=m)] for m in ENTRY_MODULES], cwd=REPO)
    bad = [(m, err[-800:]) for m, (rc, err) in zip(ENTRY_MODULES, runs) if rc]
    assert bad == [], bad
