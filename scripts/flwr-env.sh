# Source me: makes `flwr` use this project's profiles (pyproject-flwr.toml) and keeps
# Flower from installing dependencies per run (they are in the venv already).
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLWR_HOME="${FLWR_HOME:-$_root/.flwr-home}"
mkdir -p "$FLWR_HOME"
# Flower reads a relative `root-certificates` path from the current directory: anchor
# the project's relative paths at the checkout so `flwr` works from anywhere.
sed -E 's#^(root-certificates[[:space:]]*=[[:space:]]*")([^/~"][^"]*)"#\1'"$_root"'/\2"#' \
  "$_root/pyproject-flwr.toml" >"$FLWR_HOME/config.toml"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
unset _root
