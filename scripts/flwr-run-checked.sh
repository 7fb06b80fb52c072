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
check_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --run-config | -c | --federation-config)
      opt="${args[i]}"; [ "$opt" = -c ] && opt=--run-config
      check_args+=("$opt" "${args[i + 1]:-}"); i=$((i + 1)) ;;
    --run-config=* | --federation-config=*)
      check_args+=("${args[i]%%=*}" "${args[i]#*=}") ;;
  esac
done
flower-llm check-config --app "$root" "${check_args[@]}" || exit 2
exec flwr run "$root" "$@"
