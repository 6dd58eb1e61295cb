#!/usr/bin/env bash
# Does every GPU path of ofa-ds work on this node, and how fast? One JSON: OUT_DIR/gpu_check.json.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--budget SECONDS] [--only PART,PART] [--attention-cases N]
# Uses the python on PATH (the node's own torch; PYTHON=... to choose another) and installs nothing.
# What each part does: benchmarks/gpu_check.py. Exit status 1 when a part failed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
exec "$python" "$here/gpu_check.py" "$@"
