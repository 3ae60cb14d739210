#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the whole test suite with the fixed hypothesis profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}" OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
