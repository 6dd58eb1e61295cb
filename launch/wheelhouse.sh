#!/usr/bin/env bash
# Collect every wheel ofa-ds needs into DIR, for nodes without internet; then on a node, from this checkout:
# bash launch/install.sh --wheelhouse DIR.
#   bash launch/wheelhouse.sh DIR [--python-version X.Y] [--platform TAG] [--with-torch] [--skip-installed]
# Collected: ofa-ds's own wheel and its dependencies (with the test extra: gpu_check runs tests) at the versions CI
# tests (constraints.txt), or at this Python's torch and triton where it has a torch inside the tested range.
# torch and what a CUDA torch brings (triton, nvidia-*, cuda-*) are left out, since clusters have their own;
# --with-torch adds them (PyPI's torch for Linux x86_64 is a CUDA build with several GB of CUDA wheels).
# The set is resolved for this Python (PYTHON=..., best the nodes' own); --python-version and --platform (a pip tag
# such as manylinux_2_28_x86_64; repeat it for each tag the nodes accept, pip does not widen it) fetch the files for
# another one, and ofa-ds's wheel is then built without its optional C extensions (the loader uses Pillow and numpy
# instead: same pixels, slower).
# --skip-installed leaves out what this Python already has (run it in the nodes' own environment or container).
# Needs the package index (pip >= 22.2) and a C compiler (ofa-ds's extensions; deepspeed is only a source package).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DIR=""
TARGET=()
WITH_TORCH=""
SKIP_INSTALLED=""
die() { echo "wheelhouse.sh: $1" >&2; exit 1; }
usage() { echo "wheelhouse.sh: $1 (bash launch/wheelhouse.sh --help)" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version|--platform) [ $# -ge 2 ] || usage "$1 needs a value"; TARGET+=("$1" "$2"); shift 2 ;;
    --with-torch) WITH_TORCH=--with-torch; shift ;;
    --skip-installed) SKIP_INSTALLED=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) usage "unknown option $1" ;;
    *) [ -z "$DIR" ] || usage "one DIR only"; DIR=$1; shift ;;
  esac
done
[ -n "$DIR" ] || usage "give the directory to fill"
"$PY" -m pip install --help 2> /dev/null | grep -- --report > /dev/null || die "$PY has no pip >= 22.2 (--report)"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$ROOT"

# ofa-ds's wheel. setuptools packs whatever build/lib holds, stale modules included: start from a clean build/.
# The CUDA extension is not prebuilt (the wheel carries its sources; a CUDA node compiles them on first use).
rm -rf build
if [ ${#TARGET[@]} -gt 0 ]; then
  export OFA_DS_BUILD_C=0
fi
OFA_DS_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps -w "$DIR" .
rm -rf build

# The dependencies: resolved with pip's resolver (metadata only), then fetched one file each.
"$PY" ofa_ds/dependencies.py requirements > "$TMP/requirements.txt"
AS_INSTALLED=""
if "$PY" ofa_ds/dependencies.py check-torch > /dev/null; then
  AS_INSTALLED=--as-installed
fi
"$PY" ofa_ds/dependencies.py constraints constraints.txt $AS_INSTALLED > "$TMP/constraints.txt"
RESOLVE=(--dry-run -q --report "$TMP/report.json" -c "$TMP/constraints.txt" -r "$TMP/requirements.txt")
if [ -z "$SKIP_INSTALLED" ]; then
  RESOLVE+=(--ignore-installed)
fi
"$PY" -m pip install "${RESOLVE[@]}"
"$PY" ofa_ds/dependencies.py wheels "$TMP/report.json" $WITH_TORCH > "$TMP/wheels.txt"
if [ -s "$TMP/wheels.txt" ]; then
  FORMAT=(--prefer-binary)
  if [ ${#TARGET[@]} -gt 0 ]; then  # wheels only, except what has none at all (pure Python, built below)
    FORMAT=(--only-binary=:all: --no-binary="$("$PY" ofa_ds/dependencies.py sources "$TMP/report.json")")
  fi
  "$PY" -m pip download -q --no-deps "${FORMAT[@]}" ${TARGET[@]+"${TARGET[@]}"} -d "$TMP/files" \
      -r "$TMP/wheels.txt" || die "a dependency has no wheel for ${TARGET[*]} (pip's message above): repeat \
--platform for each tag the nodes accept (e.g. manylinux2014_x86_64 too), or run this script with the nodes' Python"
  mv "$TMP"/files/*.whl "$DIR"/ 2> /dev/null || true
  for sdist in "$TMP"/files/*; do  # a source package only (deepspeed): build its wheel here
    [ -e "$sdist" ] || continue
    "$PY" -m pip wheel -q --no-deps -w "$TMP/built" "$sdist"
  done
  for wheel in "$TMP"/built/*.whl; do
    [ -e "$wheel" ] || continue
    case "$wheel" in
      *-none-any.whl) ;;
      *) [ ${#TARGET[@]} -eq 0 ] || die "$(basename "$wheel") is compiled for this Python and platform only: run this \
script with the target's Python instead of --python-version/--platform" ;;
    esac
    mv "$wheel" "$DIR"/
  done
fi
echo "$DIR: $(ls "$DIR" | grep -c '\.whl$') wheels (ofa-ds and $(wc -l < "$TMP/wheels.txt") dependencies)"
