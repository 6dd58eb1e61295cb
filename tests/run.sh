#!/usr/bin/env bash
# The test command: install, then run the whole suite (including the slow multi-rank tests).
# For a quick local run: python -m pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python3 -m pytest -q --timeout=1200 "$@"
