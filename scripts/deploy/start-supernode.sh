#!/usr/bin/env bash
# Start SuperNode I of the local deployment (started by start-local-deployment.sh, which
# also registers its public key; a SuperNode whose key is not registered is refused).
#
#   bash scripts/deploy/start-supernode.sh I
#
# It connects to the SuperLink over TLS (trusting certs/ca.crt), authenticates with
# keys/supernode-I, reads only data/site-I.jsonl (node-config data-path) and serves its
# local Runtime API on 127.0.0.1:$((SUPERNODE_BASE_PORT + I)). ClientApps run in
# subprocesses of the SuperNode (the default isolation).
set -euo pipefail
. "$(dirname "$0")/common.sh"
i="${1:?usage: start-supernode.sh INDEX}"
for f in "$CERTS/ca.crt" "$KEYS/supernode-$i" "$DATA/site-$i.jsonl"; do
  [ -s "$f" ] || { echo "missing $f: run start-local-deployment.sh (or make-certs.sh)" >&2; exit 1; }
done
start_logged "supernode-$i" flower-supernode \
  --superlink "127.0.0.1:$SUPERLINK_PORT" \
  --root-certificates "$CERTS/ca.crt" \
  --auth-supernode-private-key "$KEYS/supernode-$i" \
  --node-config "data-path=\"$DATA/site-$i.jsonl\"" \
  --isolation subprocess \
  --host 127.0.0.1 --port "$((SUPERNODE_BASE_PORT + i))"
echo "SuperNode $i started (log $LOGS/supernode-$i.log)"
