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
python -c "import torch, flwr, transformers, peft, bitsandbytes, opacus; print('flower-llm env ready: torch', torch.__version__, '| flwr', flwr.__version__)"
