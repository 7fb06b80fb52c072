#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run` started for this project's FLWR_HOME (by PID).
set -uo pipefail
. "$(dirname "$0")/flwr-env.sh"
pids=$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true)
for pid in $pids; do
  kill "$pid" 2>/dev/null && echo "stopped local SuperLink (pid $pid)"
done
