#!/usr/bin/env bash
# A whole Flower deployment on one machine: a SuperLink with TLS and SuperNode
# authentication, and N SuperNodes, each with its own key and its own data file.
#
#   bash scripts/deploy/start-local-deployment.sh [N]        (default 3)
#   SITE_WORKERS=1 bash scripts/deploy/start-local-deployment.sh [N]   (with site workers)
#   flwr run . deployment --stream                             (after `. scripts/flwr-env.sh`)
#   bash scripts/deploy/stop-local-deployment.sh
#
# Everything lives under $DEPLOY_DIR (default .deploy/): certs/ and keys/ (make-certs.sh),
# data/site-<i>.jsonl (make_site_data.py), the SuperLink's database superlink.db,
# logs/<process>.log and the pid file. The SuperLink is started by start-superlink.sh
# (also the way to restart it after a crash), each SuperNode by start-supernode.sh.
# docs/deployment.md explains what runs where when the sites are separate machines.
set -euo pipefail
. "$(dirname "$0")/common.sh"
N="${1:-3}"

if [ -s "$PID_FILE" ]; then
  echo "A deployment seems to be running ($PID_FILE); stop it first:" >&2
  echo "  bash scripts/deploy/stop-local-deployment.sh" >&2
  exit 1
fi
mkdir -p "$DEPLOY_DIR" "$LOGS"
: >"$PID_FILE"
# Whatever fails from here on, leave nothing running.
trap 'echo "start-local-deployment failed; stopping what was started" >&2;
      bash "$(dirname "$0")/stop-local-deployment.sh"' ERR

# --- Certificates, keys and per-site data (kept if already there) ---------------------
bash "$(dirname "$0")/make-certs.sh" "$N"
missing=0
for i in $(seq 0 $((N - 1))); do [ -s "$DATA/site-$i.jsonl" ] || missing=1; done
if [ "$missing" = 1 ]; then
  python "$(dirname "$0")/make_site_data.py" "$N" --out "$DATA"
fi

# --- SuperLink (TLS, SuperNode authentication, state in $SUPERLINK_DATABASE) -----------
bash "$(dirname "$0")/start-superlink.sh"

# --- Register the SuperNodes' public keys (what the coordinator does per site) -----------
# `flwr` reaches the SuperLink through the profile: make sure it names this one.
python - "$FLWR_HOME/config.toml" "$PROFILE" "$SUPERLINK_PORT" <<'PY'
import sys, tomllib
path, profile, port = sys.argv[1:]
conn = tomllib.load(open(path, "rb")).get("superlink", {}).get(profile)
if not isinstance(conn, dict) or not str(conn.get("address", "")).endswith(f":{port}"):
    sys.exit(f"profile [superlink.{profile}] in {path} must have address = "
             f'"127.0.0.1:{port}" (it has {conn}); set PROFILE or SUPERLINK_PORT to match')
PY
# A key already in $SUPERLINK_DATABASE (from an earlier start) stays registered.
for i in $(seq 0 $((N - 1))); do
  if out=$(flwr supernode register "$KEYS/supernode-$i.pub" "$PROFILE" --name "site-$i" 2>&1); then
    echo "Registered keys/supernode-$i.pub"
  elif grep -q "already in use" <<<"$out"; then
    echo "keys/supernode-$i.pub is registered already"
  else
    echo "$out" >&2
    false
  fi
done

# --- Site workers (SITE_WORKERS=1), before the SuperNodes that relay to them -------------
if [ "$SITE_WORKERS" = 1 ]; then
  for i in $(seq 0 $((N - 1))); do
    bash "$(dirname "$0")/start-site-worker.sh" "$i"
  done
fi

# --- SuperNodes ----------------------------------------------------------------------------
for i in $(seq 0 $((N - 1))); do
  bash "$(dirname "$0")/start-supernode.sh" "$i"
done
echo "Deployment up: $N SuperNodes. Run:  flwr run . $PROFILE --stream"
