#!/usr/bin/env bash
# The embedded default: a 4-bit tiny Llama fine-tuned with LoRA by 4 simulated sites
# (medical, finance, smart-home data, mostly one domain each) over 3 rounds of FedAvg.
# Extra arguments go to `flwr run`, e.g. --run-config "fed.num-rounds=5".
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
. scripts/flwr-env.sh
trap 'bash scripts/stop-local-superlink.sh >/dev/null' EXIT
NUM_CLIENTS="${NUM_CLIENTS:-4}"
flwr run . local --stream \
  --federation-config "num-supernodes=$NUM_CLIENTS client-resources-num-cpus=1" \
  --run-config "output.dir=\"$PWD/outputs\" output.run-name=\"default\"" "$@"
echo "--- outputs/default/summary.json"
cat outputs/default/summary.json
