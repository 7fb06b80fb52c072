#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run` started for this project's FLWR_HOME, and every
# process it started (the simulation process, Ray and its workers): stopping the
# SuperLink alone leaves a running simulation training on for minutes.
#
# Processes are found two ways: the SuperLink's process tree, and any Flower or Ray
# process whose environment holds this FLWR_HOME (Ray re-parents some workers to init,
# outside the tree). Another checkout's processes have another FLWR_HOME.
set -uo pipefail
. "$(dirname "$0")/flwr-env.sh"
descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}
ours_by_environment() {
  local dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    [ "$pid" = "$$" ] && continue
    grep -qE 'ray::|raylet|gcs_server|default_worker|flwr-simulation|flower-superlink|flwr-serverapp|flwr-clientapp|ray/dashboard|runtime_env' \
      "$dir/cmdline" 2>/dev/null || continue
    tr '\0' '\n' <"$dir/environ" 2>/dev/null | grep -qx "FLWR_HOME=$FLWR_HOME" && echo "$pid"
  done
}
pids=$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true)
tree=""
for pid in $pids; do tree="$tree $pid $(descendants "$pid" | tr '\n' ' ')"; done
tree=$(echo $tree $(ours_by_environment) | tr ' ' '\n' | sort -un | tr '\n' ' ')
[ -z "${tree// /}" ] && exit 0
kill $tree 2>/dev/null
alive=""
for _ in $(seq 50); do
  # A zombie has finished; only a running process counts as alive.
  alive=$(for p in $tree; do
    state=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) && [ "$state" != Z ] && echo "$p"
  done)
  [ -z "$alive" ] && break
  sleep 0.2
done
[ -n "$alive" ] && kill -9 $alive 2>/dev/null
echo "stopped the local SuperLink ($pids) and $(($(echo $tree | wc -w) - $(echo $pids | wc -w))) process(es) of its runs"
