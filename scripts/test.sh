#!/usr/bin/env bash
# Run the test suite: everything that can run on a CPU (unit, slow, e2e) except the tests
# marked `long` (e2e tests of minutes each, listed in README.md); gpu tests skip themselves
# without CUDA. Pass pytest arguments to
# choose otherwise, e.g. `-m long` for the long ones (CI runs both), `-m "not e2e"` for a
# quick run. The 20 slowest tests are listed at the end (keep the default run under 15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
. scripts/flwr-env.sh
export FLOWER_LLM_CACHE="${FLOWER_LLM_CACHE:-$PWD/.flwr-home/cache}"
marker=(-m "not long")
for arg in "$@"; do
  [[ "$arg" == "-m" || "$arg" == -m* ]] && marker=()
done
python -m pytest --durations=20 "${marker[@]}" "$@"
