#!/usr/bin/env bash
# The test command: install, then run the whole suite (including the slow multi-rank tests).
# For a quick local run: python -m pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
python3 -m ruff check .  # lint (ruff.toml; ruff comes with the test extra)
python3 -m ruff format --check .  # the formatter's layout
python3 -m pytest -v --durations=15 --timeout=1200 "$@"  # every test named as it runs; the slowest listed
