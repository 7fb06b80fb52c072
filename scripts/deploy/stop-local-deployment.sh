#!/usr/bin/env bash
# Stop every process start-local-deployment.sh started, by the PIDs in its pid file, with
# the processes they spawned (the SuperLink's SuperExec and ServerApp, each SuperNode's
# SuperExec and ClientApps): SIGTERM first, SIGKILL whatever is left after 10 s.
set -uo pipefail
. "$(dirname "$0")/common.sh"
[ -s "$PID_FILE" ] || { echo "no local deployment running ($PID_FILE is empty)"; exit 0; }

# A process and all its descendants (the SuperLink starts its SuperExec in a new session,
# so a process group would miss it).
tree() {
  echo "$1"
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

# SuperNodes first (in reverse start order), the SuperLink last.
mapfile -t entries < <(tac "$PID_FILE")
all=()
for entry in "${entries[@]}"; do
  read -r name pid <<<"$entry"
  kill -0 "$pid" 2>/dev/null || continue
  mapfile -t procs < <(tree "$pid")
  all+=("${procs[@]}")
  kill -TERM "${procs[@]}" 2>/dev/null
  echo "stopping $name (pid $pid, ${#procs[@]} processes)"
done
for _ in $(seq 1 50); do
  alive=0
  for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && break
  sleep 0.2
done
for pid in "${all[@]}"; do
  kill -KILL "$pid" 2>/dev/null && echo "killed pid $pid after 10 s"
done
: >"$PID_FILE"
