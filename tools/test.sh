#!/usr/bin/env bash
# Set up (tools/setup.sh), then run the test suite in two tiers with the fixed hypothesis profile:
# tier 1, the fast tier (neither `engine` nor `heavy`: every strategy at TP=2 with one TP=4 capture
# each, every op table and unit, bad input, the mutants' kill tests); then, only if it passed,
# tier 2 (`engine` or `heavy`; Debian's Chromium installed first for the report's rendering test).
# `--fast`: tier 1 only. Other arguments go to pytest in both tiers.
# Each tier prints its 25 slowest tests and its time.
set -euo pipefail
cd "$(dirname "$0")/.."
fast_only=0
args=()
for a in "$@"; do
    if [ "$a" = "--fast" ]; then fast_only=1; else args+=("$a"); fi
done
bash tools/setup.sh
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" OMP_NUM_THREADS=1

tier() {  # tier NAME MARK-EXPRESSION: a tier that selects no test (pytest's 5) is not a failure
    local start=$SECONDS rc=0
    echo "== tier $1: -m \"$2\""
    .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 -m "$2" tests ${args[@]+"${args[@]}"} || rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then
        echo "== tier $1 FAILED (exit $rc) after $((SECONDS - start)) s"
        exit "$rc"
    fi
    echo "== tier $1 passed in $((SECONDS - start)) s"
}

tier 1 "not engine and not heavy"
[ "$fast_only" = 1 ] && exit 0
# tier 2 renders the HTML report in Debian's headless Chromium (tests/test_html_report.py)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo -n"
    $sudo_ apt-get install -y -q chromium >/dev/null 2>&1 \
        || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q chromium >/dev/null 2>&1; } \
        || echo "== could not install Chromium (apt-get install chromium); its test will say so"
fi
tier 2 "engine or heavy"
