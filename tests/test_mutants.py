"""The mutation harness (`fxpasses.testing.mutants`, `tools/mutation_score.py`) is what the README's
score says: at least 30 named mutants, each with kill tests that exist and run in the fast tier."""
import subprocess
import sys
from pathlib import Path

import pytest

from fxpasses.testing import mutants

TESTS = Path(__file__).resolve().parent


def test_at_least_thirty_named_mutants_each_saying_what_it_breaks():
    assert len(mutants.MUTANTS) >= 30, sorted(mutants.MUTANTS)
    for name, m in mutants.MUTANTS.items():
        assert m.name == name and len(m.what) > 20 and m.kills, m


FAST = "not engine and not heavy"


def _fast_tier_node_ids(config, session) -> list[str]:
    """The fast tier's node ids (under tests/): this session's own items when it is the fast tier
    run over the whole directory (`tools/test.sh`), else a `--collect-only` run of it."""
    whole_dir = [Path(a).resolve() for a in config.args] == [TESTS]
    narrowed = config.option.keyword or config.option.deselect or getattr(config.option, "lf", False)
    if config.option.markexpr == FAST and whole_dir and not narrowed:
        return [item.nodeid.split("tests/", 1)[-1] for item in session.items]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "-m", FAST, "."], cwd=TESTS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line.split("tests/", 1)[-1] for line in proc.stdout.splitlines() if "::" in line]


def test_every_kill_test_exists_in_the_fast_tier(request):
    fast = _fast_tier_node_ids(request.config, request.session)
    assert len(fast) > 100, fast   # the whole tier, not one module
    for m in mutants.MUTANTS.values():
        for kill in m.kills:
            assert any(nodeid == kill or nodeid.startswith(kill + "[") or nodeid.startswith(kill + "::")
                       or (kill.endswith(".py") and nodeid.startswith(kill + "::")) for nodeid in fast), \
                f"{m.name}: kill test {kill} is not collected in the fast tier"


def test_an_unknown_mutant_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown mutant 'no_such_fault'.*padding_missing"):
        mutants.activate("no_such_fault")
