#!/usr/bin/env bash
# Start SuperNode I of the local deployment (started by start-local-deployment.sh, which
# also registers its public key; a SuperNode whose key is not registered is refused).
#
#   bash scripts/deploy/start-supernode.sh I
#
# It connects to the SuperLink over TLS (trusting certs/ca.crt), authenticates with
# keys/supernode-I, reads only data/site-I.jsonl (node-config data-path) and serves its
# local Runtime API on 127.0.0.1:$((SUPERNODE_BASE_PORT + I)). ClientApps run in
# subprocesses of the SuperNode (the default isolation). With SITE_WORKERS=1 its node-config
# also names the site worker's socket (start-site-worker.sh), and its ClientApps relay
# every message to that worker instead of loading the model themselves.
#
# NODE_CONFIG_I (optional) adds entries to SuperNode I's node-config, in --node-config's
# form, e.g. NODE_CONFIG_0='task-file="/srv/tasks/medical.jsonl"' (the site's own task file).
#
# FAST_CLIENTAPP (default 1) puts scripts/deploy/bin first on the SuperNode's PATH: its
# flwr-clientapp runs Flower's own ClientApp process without importing the SuperNode
# server first (flower_llm/clientapp_process.py), about 0.4 s of CPU less per message.
#
# It waits until the SuperNode has joined (up to 60 s) and exits 1, saying why, if the
# SuperLink refused it (an unregistered key) or its local port was taken. Used again after
# a SuperNode died, it starts that site again.
set -euo pipefail
. "$(dirname "$0")/common.sh"
i="${1:?usage: start-supernode.sh INDEX}"
for f in "$CERTS/ca.crt" "$KEYS/supernode-$i" "$DATA/site-$i.jsonl"; do
  [ -s "$f" ] || { echo "missing $f: run start-local-deployment.sh (or make-certs.sh)" >&2; exit 1; }
done
touch "$PID_FILE"
old=$(awk -v n="supernode-$i" '$1 == n {print $2}' "$PID_FILE")
for pid in $old; do
  alive "$pid" && { echo "supernode-$i is already running (pid $pid)" >&2; exit 1; }
done
# Up to 8 tries, about 2 minutes: a SuperNode that stopped without signing off (killed,
# or its machine died) counts as online at the SuperLink for up to two heartbeats (60 s),
# and the SuperLink refuses to activate it again until then.
for attempt in 1 2 3 4 5 6 7 8; do
  # Restarting a SuperNode that died: forget the dead process, keep its old log.
  awk -v n="supernode-$i" '$1 != n' "$PID_FILE" >"$PID_FILE.tmp" && mv "$PID_FILE.tmp" "$PID_FILE"
  if [ -s "$LOGS/supernode-$i.log" ]; then
    mv "$LOGS/supernode-$i.log" "$LOGS/supernode-$i.$(date +%Y%m%d-%H%M%S).log"
  fi
  seen=$( (wc -l <"$LOGS/superlink.log") 2>/dev/null || echo 0)
  node_config="data-path=\"$DATA/site-$i.jsonl\""
  if [ "$SITE_WORKERS" = 1 ]; then
    node_config="$node_config worker-socket=\"$(worker_socket "$i")\""
  fi
  extra_var="NODE_CONFIG_$i"
  if [ -n "${!extra_var:-}" ]; then node_config="$node_config ${!extra_var}"; fi
  path="$PATH"
  if [ "${FAST_CLIENTAPP:-1}" = 1 ]; then path="$(cd "$(dirname "$0")" && pwd)/bin:$PATH"; fi
  start_logged "supernode-$i" env PATH="$path" flower-supernode \
    --superlink "127.0.0.1:$SUPERLINK_PORT" \
    --root-certificates "$CERTS/ca.crt" \
    --auth-supernode-private-key "$KEYS/supernode-$i" \
    --node-config "$node_config" \
    --isolation subprocess \
    --host 127.0.0.1 --port "$((SUPERNODE_BASE_PORT + i))"
  pid=$!

  # Wait until it has joined (it logs the node id the SuperLink gave it) or has exited.
  for _ in $(seq 1 120); do
    grep -q "SuperNode ID:" "$LOGS/supernode-$i.log" 2>/dev/null && break
    alive "$pid" || break
    sleep 0.5
  done
  if id=$(grep -o "SuperNode ID: [0-9]*" "$LOGS/supernode-$i.log" 2>/dev/null); then
    echo "SuperNode $i joined as node ${id#SuperNode ID: } (log $LOGS/supernode-$i.log)"
    exit 0
  fi
  if alive "$pid"; then
    echo "SuperNode $i started but has not joined yet; it keeps trying (log $LOGS/supernode-$i.log)"
    exit 0
  fi
  # It gave up. The SuperLink's log (on this machine) says why.
  why=$(tail -n +"$((seen + 1))" "$LOGS/superlink.log" 2>/dev/null |
    grep -o "No SuperNode found with the given public key\|could not be activated" | tail -1 || true)
  if [ "$why" = "could not be activated" ] && [ "$attempt" -lt 8 ]; then
    echo "SuperNode $i: the SuperLink still counts this node online (it stopped without" \
      "signing off); trying again in 15 s" >&2
    sleep 15
    continue
  fi
  case "$why" in
    "No SuperNode found"*) reason="its public key keys/supernode-$i.pub is not registered" ;;
    "could not be activated") reason="the SuperLink still counts it online" ;;
    *)
      if grep -q "address already in use" "$LOGS/supernode-$i.log" 2>/dev/null; then
        reason="its port 127.0.0.1:$((SUPERNODE_BASE_PORT + i)) is in use (set SUPERNODE_BASE_PORT)"
      else
        reason="see the log"
      fi
      ;;
  esac
  echo "SuperNode $i was refused and exited: $reason (log $LOGS/supernode-$i.log)" >&2
  if [ "$reason" = "see the log" ]; then
    echo "last lines of $LOGS/supernode-$i.log:" >&2
    tail -n 8 "$LOGS/supernode-$i.log" | sed 's/^/  /' >&2 || true
  fi
  exit 1
done
