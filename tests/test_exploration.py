"""The suite explores what it says: every hypothesis example count goes through the profile
(`helpers.examples`: deep = 5x ci), and the token-count sets made from a drawn seed differ from each
other even for hypothesis's first (minimal) seed."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import TOKEN_SETS, edge_counts, token_sets

TESTS = Path(__file__).resolve().parent


def _settings_calls():
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "settings":
                yield path.name, node


def test_every_max_examples_goes_through_the_profile():
    """A literal `max_examples` would bypass HYPOTHESIS_PROFILE=deep."""
    seen, literal = 0, []
    for name, call in _settings_calls():
        for kw in call.keywords:
            if kw.arg == "max_examples":
                seen += 1
                if not (isinstance(kw.value, ast.Call) and getattr(kw.value.func, "id", None) == "examples"):
                    literal.append(f"{name}:{call.lineno}")
    assert seen >= 20, seen
    assert not literal, f"max_examples not given as examples(n): {literal}"


_COLLECT = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import helpers
out = {"examples_2": helpers.examples(2), "token_sets": helpers.TOKEN_SETS, "tests": {}}
for name in sys.argv[2:]:
    mod = importlib.import_module(name)
    for attr, fn in vars(mod).items():
        s = getattr(fn, "_hypothesis_internal_use_settings", None)
        if attr.startswith("test_") and s is not None:
            out["tests"][f"{name}.{attr}"] = s.max_examples
print(json.dumps(out))
"""


def _collect(profile, modules):
    env = {**os.environ, "HYPOTHESIS_PROFILE": profile}
    proc = subprocess.run([sys.executable, "-c", _COLLECT, str(TESTS), *modules], env=env, capture_output=True,
                          text=True, timeout=600, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_deep_profile_runs_five_times_the_examples_of_every_property_test():
    modules = sorted({name[:-3] for name, call in _settings_calls()
                      if any(kw.arg == "max_examples" for kw in call.keywords)})
    ci, deep = _collect("ci", modules), _collect("deep", modules)
    assert (ci["examples_2"], deep["examples_2"]) == (2, 10)
    assert (ci["token_sets"], deep["token_sets"]) == (20, 100)
    assert ci["tests"] and set(ci["tests"]) == set(deep["tests"])
    assert {k: 5 * v for k, v in ci["tests"].items()} == deep["tests"]


def test_token_sets_from_one_seed_differ_and_keep_the_edge_counts():
    for tp in (2, 4):
        sets = token_sets(0, edge_counts(tp))   # seed 0: hypothesis's first, minimal draw
        assert len(sets) == TOKEN_SETS
        assert len({tuple(s) for s in sets}) == TOKEN_SETS
        assert all(edge_counts(tp) <= set(s) and s == sorted(s) and 1 <= s[0] and s[-1] <= 300 for s in sets)
        assert {1, tp - 1 or 1, tp, tp + 1, 3 * tp + 1} == edge_counts(tp)
    assert token_sets(1, {1}) != token_sets(2, {1})
    assert token_sets(7, {1}) == token_sets(7, {1})        # reproducible from the seed hypothesis prints
