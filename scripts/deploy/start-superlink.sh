#!/usr/bin/env bash
# Start the SuperLink of the local deployment (start-local-deployment.sh calls this), or
# start it again after it died: the SQLite state in $SUPERLINK_DATABASE keeps the
# registered SuperNodes, which reconnect on their own (flower-supernode retries without
# limit), so no key has to be registered again. A run the dead SuperLink was executing is
# marked failed; continue it with `flwr run ... output.resume=true` (docs/deployment.md).
#
#   bash scripts/deploy/start-superlink.sh
#
# TLS (certs/ from make-certs.sh) and SuperNode authentication are always on. One HTTPS
# port, $SUPERLINK_HOST:$SUPERLINK_PORT, serves the Fleet API (SuperNodes), the Control
# API (`flwr`) and the Runtime API (the ServerApp process it starts: --isolation
# subprocess, which connects to 127.0.0.1 when the host is 0.0.0.0).
set -euo pipefail
. "$(dirname "$0")/common.sh"
for f in ca.crt server.crt server.key; do
  [ -s "$CERTS/$f" ] || { echo "missing $CERTS/$f: run make-certs.sh first" >&2; exit 1; }
done
mkdir -p "$DEPLOY_DIR" "$LOGS"
touch "$PID_FILE"
old=$(awk '$1 == "superlink" {print $2}' "$PID_FILE")
if [ -n "$old" ] && alive "$old"; then
  echo "The SuperLink is already running (pid $old)" >&2
  exit 1
fi
# A dead SuperLink's log is kept next to the new one.
if [ -s "$LOGS/superlink.log" ]; then
  mv "$LOGS/superlink.log" "$LOGS/superlink.$(date +%Y%m%d-%H%M%S).log"
fi

start_logged superlink flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" \
  --ssl-certfile "$CERTS/server.crt" \
  --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth \
  --database "$SUPERLINK_DATABASE" \
  --isolation subprocess \
  --disable-runtime-dependency-installation \
  --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT"
# The SuperLink goes first in the pid file (stop-local-deployment.sh stops it last).
{ grep '^superlink ' "$PID_FILE" | tail -1; grep -v '^superlink ' "$PID_FILE" || true; } \
  >"$PID_FILE.tmp"
mv "$PID_FILE.tmp" "$PID_FILE"

case "$SUPERLINK_HOST" in 0.0.0.0 | "::") probe=127.0.0.1 ;; *) probe="$SUPERLINK_HOST" ;; esac
[[ "$probe" == *:* ]] && probe="[$probe]"
pid=$(awk '$1 == "superlink" {print $2}' "$PID_FILE")
health() {
  curl -sf --max-time 5 --cacert "$CERTS/ca.crt" "https://$probe:$SUPERLINK_PORT/health" >/dev/null
}
for _ in $(seq 1 120); do
  health && break
  alive "$pid" || break # it exited (the port is taken, a certificate is unreadable...)
  sleep 0.5
done
health || {
  echo "SuperLink did not come up on https://$probe:$SUPERLINK_PORT; see $LOGS/superlink.log" >&2
  bash "$(dirname "$0")/stop-local-deployment.sh" superlink >&2
  exit 1
}
echo "SuperLink on https://$SUPERLINK_HOST:$SUPERLINK_PORT (log $LOGS/superlink.log)"
