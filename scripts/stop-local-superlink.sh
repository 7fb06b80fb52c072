#!/usr/bin/env bash
# Stop the local SuperLink that `flwr run` started for this project's FLWR_HOME, and every
# process it started (the simulation process, Ray and its workers): stopping the
# SuperLink alone leaves a running simulation training on for minutes.
set -uo pipefail
. "$(dirname "$0")/flwr-env.sh"
descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}
pids=$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true)
for pid in $pids; do
  tree="$pid $(descendants "$pid" | tr '\n' ' ')"
  kill $tree 2>/dev/null
  for _ in $(seq 50); do
    alive=$(for p in $tree; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    [ -z "$alive" ] && break
    sleep 0.2
  done
  [ -n "${alive:-}" ] && kill -9 $alive 2>/dev/null
  echo "stopped local SuperLink (pid $pid) and $(($(echo $tree | wc -w) - 1)) process(es) it started"
done
