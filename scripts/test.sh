#!/usr/bin/env bash
# Run the test suite: everything that can run on a CPU (unit, slow, e2e); gpu tests skip
# themselves without CUDA. Pass extra pytest arguments, e.g. -m "not e2e" for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
. scripts/flwr-env.sh
export FLOWER_LLM_CACHE="${FLOWER_LLM_CACHE:-$PWD/.flwr-home/cache}"
python -m pytest "$@"
