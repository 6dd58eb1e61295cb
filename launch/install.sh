#!/usr/bin/env bash
# Install ofa-ds and its dependencies into the current Python environment (PYTHON=... picks the interpreter).
#   bash launch/install.sh                    # this checkout, editable, at the versions CI tests (constraints.txt)
#   bash launch/install.sh --wheelhouse DIR   # ofa-ds's wheel and its dependencies from DIR (launch/wheelhouse.sh),
#                                             # no package index: for nodes without internet
# A torch already installed inside the tested range (ofa_ds/dependencies.py) is kept, with the triton it brought:
# pip is held to their exact versions, so it stops on a conflict rather than replace them. Without torch, the pinned
# torch is installed first: left to deepspeed's install, pip would pull a CUDA build of torch and several GB of CUDA
# packages (on this project's CPU machines the pinned version resolves to torch's CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) [ $# -ge 2 ] || { echo "install.sh: --wheelhouse needs a directory" >&2; exit 2; }
                  WHEELHOUSE=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (bash launch/install.sh --help)" >&2; exit 2 ;;
  esac
done
PIP=("$PY" -m pip install -q)
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || { echo "install.sh: --wheelhouse '$WHEELHOUSE': no such directory" >&2; exit 2; }
  PIP+=(--no-index --find-links "$(cd "$WHEELHOUSE" && pwd)")
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

status=0
"$PY" ofa_ds/dependencies.py check-torch > "$TMP/why" || status=$?
case $status in
  0) ;;
  3) if [ -n "$WHEELHOUSE" ] && ! ls "$WHEELHOUSE"/torch-*.whl > /dev/null 2>&1; then
       echo "install.sh: no torch installed and none in $WHEELHOUSE: install the cluster's torch first, or collect" \
            "one with launch/wheelhouse.sh --with-torch" >&2
       exit 1
     fi
     "$PY" ofa_ds/dependencies.py constraints constraints.txt > "$TMP/constraints.txt"  # triton: what torch brings
     "${PIP[@]}" -c "$TMP/constraints.txt" torch ;;
  4) echo "install.sh: $(cat "$TMP/why"): install a torch inside it first, or uninstall this one for the tested" \
          "torch" >&2
     exit 1 ;;
  *) echo "install.sh: $PY could not run ofa_ds/dependencies.py" >&2; exit 1 ;;
esac
"$PY" ofa_ds/dependencies.py constraints constraints.txt --as-installed > "$TMP/constraints.txt"
if [ -n "$WHEELHOUSE" ]; then
  "${PIP[@]}" -c "$TMP/constraints.txt" "ofa-ds[test]"
  # The wheelhouse's build even where an ofa-ds of the same version is installed, which pip would otherwise keep.
  "${PIP[@]}" --no-deps --force-reinstall ofa-ds
else
  "${PIP[@]}" -c "$TMP/constraints.txt" -e ".[test]"
fi
