#!/usr/bin/env bash
# Stop every process start-local-deployment.sh started, by the PIDs in its pid file, with
# the processes they spawned (the SuperLink's SuperExec and ServerApp, each SuperNode's
# SuperExec and ClientApps): SIGTERM first, SIGKILL whatever is left after 10 s.
#
#   bash scripts/deploy/stop-local-deployment.sh              everything
#   bash scripts/deploy/stop-local-deployment.sh supernode-2  only the named processes
#
# The names are those of the pid file ($DEPLOY_DIR/pids): superlink, supernode-<i>,
# worker-<i> (site workers; restart-site-worker.sh stops and starts one).
set -uo pipefail
. "$(dirname "$0")/common.sh"
[ -s "$PID_FILE" ] || { echo "no local deployment running ($PID_FILE is empty)"; exit 0; }
only=" $* "

# A process and all its descendants (the SuperLink starts its SuperExec in a new session,
# so a process group would miss it).
tree() {
  echo "$1"
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

# Stop the named pid-file entries with their descendants and wait for all of them:
# SIGTERM, then SIGKILL whatever is left after 10 s.
stop_entries() {
  local entry name pid procs all=()
  for entry in "$@"; do
    read -r name pid <<<"$entry"
    alive "$pid" || continue
    mapfile -t procs < <(tree "$pid")
    all+=("${procs[@]}")
    kill -TERM "${procs[@]}" 2>/dev/null
    echo "stopping $name (pid $pid, ${#procs[@]} processes)"
  done
  [ ${#all[@]} -gt 0 ] || return 0
  for _ in $(seq 1 50); do
    local left=0
    for pid in "${all[@]}"; do alive "$pid" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.2
  done
  for pid in "${all[@]}"; do
    alive "$pid" && kill -KILL "$pid" 2>/dev/null && echo "killed pid $pid after 10 s"
  done
  return 0
}

# The SuperNodes first, and only once they are gone the SuperLink: a SuperNode signs off
# at the SuperLink when it stops. One that cannot (its SuperLink went first) stays
# "online" in the SuperLink's database for up to a minute, and a restart of it within
# that minute is refused.
mapfile -t entries < <(tac "$PID_FILE")
nodes=()
links=()
for entry in "${entries[@]}"; do
  read -r name _ <<<"$entry"
  [ $# -eq 0 ] || [[ "$only" == *" $name "* ]] || continue
  if [ "$name" = superlink ]; then links+=("$entry"); else nodes+=("$entry"); fi
done
stop_entries ${nodes[@]+"${nodes[@]}"}
stop_entries ${links[@]+"${links[@]}"}
if [ $# -eq 0 ]; then
  : >"$PID_FILE"
else
  # Keep the entries of the processes that were not named.
  awk -v only="$only" 'index(only, " " $1 " ") == 0' "$PID_FILE" >"$PID_FILE.tmp"
  mv "$PID_FILE.tmp" "$PID_FILE"
fi
