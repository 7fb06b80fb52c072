#!/usr/bin/env bash
# Start site I's worker: `flower-llm site-worker`, the long-lived process that keeps the
# site's model loaded and runs the jobs its SuperNode's ClientApps relay to it.
#
#   bash scripts/deploy/start-site-worker.sh I
#
# It listens on $DEPLOY_DIR/workers/site-I/worker.sock (directory 0700, socket 0600), is
# recorded as worker-I in the pid file, logs to logs/worker-I.log, and this script waits
# until it answers a status request (up to 60 s). Used again after the worker died, it
# starts it again; restart-site-worker.sh stops a running one first.
set -euo pipefail
. "$(dirname "$0")/common.sh"
i="${1:?usage: start-site-worker.sh INDEX}"
sock="$(worker_socket "$i")"
mkdir -p "$DEPLOY_DIR"
touch "$PID_FILE"
for pid in $(awk -v n="worker-$i" '$1 == n {print $2}' "$PID_FILE"); do
  alive "$pid" && { echo "worker-$i is already running (pid $pid)" >&2; exit 1; }
done
awk -v n="worker-$i" '$1 != n' "$PID_FILE" >"$PID_FILE.tmp" && mv "$PID_FILE.tmp" "$PID_FILE"
if [ -s "$LOGS/worker-$i.log" ]; then
  mv "$LOGS/worker-$i.log" "$LOGS/worker-$i.$(date +%Y%m%d-%H%M%S).log"
fi
# WORKER_THREADS: torch threads per worker (several workers on one machine share its cores).
start_logged "worker-$i" flower-llm site-worker --socket "$sock" \
  ${WORKER_THREADS:+--threads "$WORKER_THREADS"}
pid=$!
for _ in $(seq 1 120); do
  if flower-llm site-worker -q --socket "$sock" --status >/dev/null 2>&1; then
    echo "Site worker $i up (pid $pid, socket $sock, log $LOGS/worker-$i.log)"
    exit 0
  fi
  alive "$pid" || break
  sleep 0.5
done
echo "Site worker $i did not come up; see $LOGS/worker-$i.log:" >&2
tail -5 "$LOGS/worker-$i.log" >&2 || true
exit 1
