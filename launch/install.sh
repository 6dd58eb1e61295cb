#!/usr/bin/env bash
# Install ofa-ds and its dependencies into the current Python environment.
# torch is installed first and pinned: with torch absent, deepspeed's install would pull a CUDA build
# of torch and several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
