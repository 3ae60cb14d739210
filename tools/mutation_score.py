"""The mutation score: run each named mutant's kill tests (`fxpasses.testing.mutants`) in a fresh
pytest process with the mutant active, and print how many the fast tier kills and which test killed
each.

    .venv/bin/python tools/mutation_score.py              # every mutant, after a control run
    .venv/bin/python tools/mutation_score.py --list       # names, what each breaks, its kill tests
    .venv/bin/python tools/mutation_score.py -m NAME ...  # some mutants only

The control run (no mutant, the union of the kill tests) must pass first, else a "kill" would prove
nothing. Only fast-tier tests count (`-m "not engine and not heavy"`). A mutant is killed when its
run fails with a test failure (pytest exit 1); a run that passes is a survivor; anything else (a
collection error, a timeout) is reported as an error, not a kill. Exit 0 only when every mutant
selected was killed. `--json FILE` writes the results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fxpasses.testing.mutants import ENV, MUTANTS  # noqa: E402

FAST = "not engine and not heavy"


def _pytest(ids, env_extra, timeout):
    env = {k: v for k, v in os.environ.items() if k != ENV}   # a mutant only where asked for
    env.update({"HYPOTHESIS_PROFILE": "ci", "OMP_NUM_THREADS": "1",
                "FXPASSES_POOL_TIMEOUT": os.environ.get("FXPASSES_POOL_TIMEOUT", "120"), **env_extra})
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", "-m", FAST, *ids]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO / "tests", env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    return rc, out, time.monotonic() - t0


def _failed_test(out: str) -> str | None:
    m = re.search(r"^FAILED (\S+)", out, re.M)
    return m.group(1) if m else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--mutant", action="append", help="only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-control", action="store_true", help="skip the control run without a mutant")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("-q", "--quiet", action="store_true", help="print the score only")
    a = ap.parse_args(argv)
    names = a.mutant or sorted(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutant(s) {unknown}; --list shows them")
    if a.list:
        for n in names:
            print(f"{n}\n    {MUTANTS[n].what}\n    kill tests: {', '.join(MUTANTS[n].kills)}")
        return 0
    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    start = time.monotonic()
    if not a.no_control:
        ids = sorted({k for n in names for k in MUTANTS[n].kills})
        say(f"control: {len(ids)} kill test(s) without a mutant ...")
        rc, out, dt = _pytest(ids, {}, a.timeout * 3)
        if rc != 0:
            print(f"control run failed (exit {rc}) in {dt:.0f} s: the kill tests must pass without a mutant\n"
                  + out[-4000:])
            return 2
        say(f"control: passed in {dt:.0f} s")
    results = {}
    for i, n in enumerate(names, 1):
        rc, out, dt = _pytest(list(MUTANTS[n].kills), {ENV: n}, a.timeout)
        if rc == 1:
            verdict, by = "killed", _failed_test(out)
        elif rc == 0:
            verdict, by = "survived", None
        else:
            verdict, by = "error", ("timeout" if rc is None else f"exit {rc}")
        results[n] = {"verdict": verdict, "by": by, "seconds": round(dt, 1), "what": MUTANTS[n].what}
        say(f"[{i}/{len(names)}] {n}: {verdict}" + (f" by {by}" if by else "") +
            f" ({dt:.0f} s, {time.monotonic() - start:.0f} s elapsed)")
        if verdict == "error" and not a.quiet:
            print(out[-2000:])
    killed = sum(r["verdict"] == "killed" for r in results.values())
    print(f"mutation score: {killed} / {len(results)} killed by the fast tier"
          + ("" if killed == len(results) else
             f"; not killed: {', '.join(n for n, r in results.items() if r['verdict'] != 'killed')}"))
    if a.json:
        Path(a.json).write_text(json.dumps({"killed": killed, "total": len(results), "mutants": results}, indent=1))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
