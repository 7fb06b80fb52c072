#!/usr/bin/env bash
# Create .venv with the pinned stack. torch goes in FIRST: with it present, no other
# package can drag in a CUDA build on a CPU-only machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,report,eval]"
# Activating the venv also sources this checkout's Flower environment, so a plain
# `flwr run .` never tries Flower's per-run dependency install (exit code 608).
hook="# flower-llm: this checkout's Flower environment"
if ! grep -qF "$hook" .venv/bin/activate; then
  cat >>.venv/bin/activate <<EOF

$hook (added by scripts/setup.sh)
if [ -n "\${BASH_VERSION:-}" ]; then
  . "$PWD/scripts/flwr-env.sh"
else
  echo "flower-llm: not bash; before 'flwr run', source $PWD/scripts/flwr-env.sh in bash" >&2
fi
EOF
fi
python -c "import torch, flwr, transformers, peft, bitsandbytes, opacus; print('flower-llm env ready: torch', torch.__version__, '| flwr', flwr.__version__)"
