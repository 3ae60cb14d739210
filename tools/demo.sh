#!/usr/bin/env bash
# Set up (tools/setup.sh) and run the main job: the demo on the bundled tiny model at TP=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export OMP_NUM_THREADS=1
exec .venv/bin/fxpasses demo --out fxpasses-out "$@"
