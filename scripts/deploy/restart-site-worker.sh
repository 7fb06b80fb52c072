#!/usr/bin/env bash
# Restart site I's worker (after an upgrade, or to free its memory): stop it by the PID in
# the pid file, then start it again. Its SuperNode keeps running; a message that arrives
# while the worker is down fails for that site (the server drops it for the round).
#
#   bash scripts/deploy/restart-site-worker.sh I
set -euo pipefail
i="${1:?usage: restart-site-worker.sh INDEX}"
bash "$(dirname "$0")/stop-local-deployment.sh" "worker-$i"
bash "$(dirname "$0")/start-site-worker.sh" "$i"
