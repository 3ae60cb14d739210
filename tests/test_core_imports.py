"""The core (the package, the pipeline and every strategy) imports neither `fxpasses.testing` nor
vLLM: vLLM is imported only inside the functions that talk to it, and the test/demo/benchmark
support is never a dependency of the pass. Checked in a fresh interpreter, so nothing this test
process has already imported counts."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    strategies = sorted(m.name for m in pkgutil.iter_modules([str(REPO / "fxpasses" / "strategies")]))
    return ["fxpasses", "fxpasses.pipeline"] + [f"fxpasses.strategies.{m}" for m in strategies]


CHECK = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules
             if m == "fxpasses.testing" or m.startswith("fxpasses.testing.") or m == "vllm" or m.startswith("vllm."))
print("\\n".join(bad))
"""


def test_core_imports_neither_testing_nor_vllm():
    mods = core_modules()
    assert "fxpasses.strategies.flashcomm1" in mods
    proc = subprocess.run([sys.executable, "-c", CHECK, *mods], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"importing {mods} failed:\n{proc.stderr}"
    bad = proc.stdout.split()
    assert not bad, (f"importing {', '.join(mods)} loaded {len(bad)} module(s) the core must not import: "
                     f"{', '.join(bad)}")
