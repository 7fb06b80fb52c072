# Source me: makes `flwr` use this project's profiles (pyproject-flwr.toml), keeps Flower
# from installing dependencies per run (they are in the venv already), and gives this
# checkout its own local SuperLink (its own FLWR_HOME and ports, see local-ports.py).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A shell that used another checkout (its venv's activate, or its flwr-env.sh) switches to
# this one: its home and ports belong to the other checkout's SuperLink.
if [ -n "${FLOWER_LLM_CHECKOUT:-}" ] && [ "$FLOWER_LLM_CHECKOUT" != "$_root" ]; then
  unset FLWR_HOME FLWR_LOCAL_SUPERLINK_HTTP_API_PORT FLWR_LOCAL_CONTROL_API_PORT
fi
export FLWR_HOME="${FLWR_HOME:-$_root/.flwr-home}"
mkdir -p "$FLWR_HOME"
# Flower reads a relative `root-certificates` path from the current directory: anchor
# the project's relative paths at the checkout so `flwr` works from anywhere.
sed -E 's#^(root-certificates[[:space:]]*=[[:space:]]*")([^/~"][^"]*)"#\1'"$_root"'/\2"#' \
  "$_root/pyproject-flwr.toml" >"$FLWR_HOME/config.toml"
if [ -z "${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-}" ] || [ -z "${FLWR_LOCAL_CONTROL_API_PORT:-}" ]; then
  _py="$(command -v python || command -v python3)"
  read -r FLWR_LOCAL_SUPERLINK_HTTP_API_PORT FLWR_LOCAL_CONTROL_API_PORT \
    < <("$_py" "$_root/scripts/local-ports.py" "$_root" "$FLWR_HOME")
  unset _py
fi
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT FLWR_LOCAL_CONTROL_API_PORT
# The marker run-default.sh and `flower-llm` look for: this shell uses this checkout.
export FLOWER_LLM_CHECKOUT="$_root"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
export TOKENIZERS_PARALLELISM=false
unset _root

# flwr_config_args ARGS...: the run and federation overrides among `flwr run` arguments,
# for `flower-llm check-config`. Sets the bash array FLWR_CONFIG_ARGS to option/value
# pairs, in order: `--run-config V`, `-c V` (as --run-config), `--federation-config V` and
# their `--opt=V` forms; every other argument is left out.
flwr_config_args() {
  FLWR_CONFIG_ARGS=()
  local args=("$@") i opt
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --run-config | -c | --federation-config)
        opt="${args[i]}"
        if [ "$opt" = -c ]; then opt=--run-config; fi
        FLWR_CONFIG_ARGS+=("$opt" "${args[i + 1]:-}")
        i=$((i + 1))
        ;;
      --run-config=* | --federation-config=*)
        FLWR_CONFIG_ARGS+=("${args[i]%%=*}" "${args[i]#*=}")
        ;;
    esac
  done
}
