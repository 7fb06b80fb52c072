#!/usr/bin/env bash
# The embedded default: a 4-bit tiny Llama fine-tuned with LoRA by 4 simulated sites
# (medical, finance, smart-home data, mostly one domain each) over 3 rounds of FedAvg,
# compared with local-only training at each site.
# Extra arguments go to `flwr run`, e.g. --run-config "fed.num-rounds=5"; they are checked
# (`flower-llm check-config`) before anything is submitted. Ctrl-C stops the run
# (`flwr stop`) and this checkout's local SuperLink with everything it started.
# Exit status: 0 when the run finished and updated the model, 1 when it failed or was
# stopped, 2 when the config was refused before submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
. scripts/flwr-env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # the embedded model never needs the hub
NUM_CLIENTS="${NUM_CLIENTS:-4}"
OUTPUTS="${FLOWER_LLM_OUTPUTS:-$PWD/outputs}"
RUN_DIR="$OUTPUTS/default"
RUN_CONFIG="output.dir=\"$OUTPUTS\" output.run-name=\"default\" output.local-only-baseline=true"
FED_CONFIG="num-supernodes=$NUM_CLIENTS client-resources-num-cpus=1"

# Check what the user asked for before Flower sees it: Flower only says "Invalid run
# configuration" and logs the key in the SuperLink's log file.
flwr_config_args "$@"
flower-llm check-config --run-config "$RUN_CONFIG" --federation-config "$FED_CONFIG" \
  ${FLWR_CONFIG_ARGS[@]+"${FLWR_CONFIG_ARGS[@]}"} || exit 2
python scripts/local-ports.py --check "$FLWR_HOME" "$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" || exit 2

RUN_ID=""
stop_run() {
  trap - INT TERM
  [ -n "${!:-}" ] && kill "$!" 2>/dev/null
  if [ -n "$RUN_ID" ]; then
    echo "--- stopping run $RUN_ID" >&2
    flwr stop "$RUN_ID" local >/dev/null 2>&1 || true
  fi
  bash scripts/stop-local-superlink.sh >&2 || true
  exit 130
}
trap stop_run INT TERM
trap 'bash scripts/stop-local-superlink.sh >/dev/null' EXIT

started=$(flwr run . local --format json --federation-config "$FED_CONFIG" \
  --run-config "$RUN_CONFIG" "$@") || {
  echo "flwr run refused the run: $started" >&2
  exit 1
}
RUN_ID=$(python -c 'import json,sys; print(json.loads(sys.argv[1]).get("run-id") or "")' \
  "$started" 2>/dev/null || true)
if [ -z "$RUN_ID" ]; then
  echo "flwr run did not start a run: $started" >&2
  exit 1
fi
echo "--- run $RUN_ID started; logs follow (Ctrl-C stops it)"
# In the background, so that a SIGTERM to this script is handled at once, not after the
# log stream ends.
flwr log "$RUN_ID" local --stream &
wait $! || true
# `flwr` exits 0 even when the ServerApp failed or was killed: ask for the run's status,
# and read the summary only if this run wrote it.
python -m flower_llm.report finished "$RUN_DIR" "$RUN_ID"
