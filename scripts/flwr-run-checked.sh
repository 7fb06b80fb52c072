#!/usr/bin/env bash
# `flwr run` of this app with its overrides checked first, from any directory:
#   scripts/flwr-run-checked.sh local --stream --run-config 'fed.num-rounds=5' \
#     --federation-config 'num-supernodes=4'
# A misspelled key, a wrong type or value, or a simulation smaller than fed.min-* is
# named on one line (exit 2) before anything is submitted; Flower itself would only say
# "Invalid run configuration". Arguments are passed to `flwr run <checkout>` unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/.venv/bin/activate"
. "$root/scripts/flwr-env.sh"
flwr_config_args "$@"
flower-llm check-config --app "$root" ${FLWR_CONFIG_ARGS[@]+"${FLWR_CONFIG_ARGS[@]}"} || exit 2
exec flwr run "$root" "$@"
