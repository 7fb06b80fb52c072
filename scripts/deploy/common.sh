# Sourced by the scripts in scripts/deploy/: settings (all overridable by the environment)
# and the environment every Flower process of a local deployment runs with.
_project="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$_project"
command -v flower-superlink >/dev/null || . .venv/bin/activate

DEPLOY_DIR="${DEPLOY_DIR:-$_project/.deploy}"    # certs/, keys/, data/, logs/, pids
SUPERLINK_HOST="${SUPERLINK_HOST:-127.0.0.1}"    # 0.0.0.0 to accept other machines
SUPERLINK_PORT="${SUPERLINK_PORT:-9093}"         # Fleet, Control and Runtime APIs (HTTPS)
# SuperLink state (registered SuperNodes, runs, messages in flight) in SQLite: a restarted
# SuperLink knows its SuperNodes again. ":flwr-in-memory:" keeps nothing across restarts.
SUPERLINK_DATABASE="${SUPERLINK_DATABASE:-$DEPLOY_DIR/superlink.db}"
SUPERNODE_BASE_PORT="${SUPERNODE_BASE_PORT:-9094}" # SuperNode i's local Runtime API: base + i
PROFILE="${PROFILE:-deployment}"                 # connection in $FLWR_HOME/config.toml
# SITE_WORKERS=1: each site gets a long-lived `flower-llm site-worker` that keeps its model
# loaded, and its SuperNode's ClientApps relay every message to it (node-config
# worker-socket). Default 0: every ClientApp process loads the model itself.
SITE_WORKERS="${SITE_WORKERS:-0}"
CERTS="$DEPLOY_DIR/certs"
KEYS="$DEPLOY_DIR/keys"
DATA="$DEPLOY_DIR/data"
LOGS="$DEPLOY_DIR/logs"
PID_FILE="$DEPLOY_DIR/pids"
WORKERS="$DEPLOY_DIR/workers"                    # workers/site-<i>/worker.sock, owner-only

# flwr-env.sh points FLWR_HOME at the checkout's .flwr-home/ (with this project's
# profiles); a FLWR_HOME set by the caller is kept as it is.
if [ -z "${FLWR_HOME:-}" ]; then
  . "$_project/scripts/flwr-env.sh"
fi
# The venv holds every dependency: Flower must never `uv sync` an app at run time.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
unset _project

# Start "$@" in its own session (a Ctrl-C in the calling shell does not reach it), logging
# to $LOGS/<name>.log and recording "<name> <pid>" in the pid file.
start_logged() {
  local name="$1"
  shift
  mkdir -p "$LOGS"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo "$name $!" >>"$PID_FILE"
}

# The Unix socket of site $1's worker.
worker_socket() { echo "$WORKERS/site-$1/worker.sock"; }

# Whether process $1 is running (a zombie, which nobody may reap in a container, is not).
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ "$state" != Z* ]]
}
