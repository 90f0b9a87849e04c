#!/usr/bin/env bash
# Build the sdist and the wheel into dist/ (or --outdir DIR). The wheel is built from the sdist, so
# a file missing from the sdist fails here rather than on a user's machine; then both archives are
# checked for the package data (templates and icons).
#   packaging/build.sh                  isolated build (pip fetches setuptools from PyPI)
#   packaging/build.sh --no-isolation   offline: uses the setuptools/wheel of $PYTHON
# Extra arguments go to `python -m build`. PYTHON defaults to .venv/bin/python, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
outdir=dist
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --outdir) outdir="$2"; shift 2 ;;
    --outdir=*) outdir="${1#--outdir=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
"$PYTHON" -m build --version >/dev/null 2>&1 || {
  echo "build.sh: the 'build' package is missing: $PYTHON -m pip install build" >&2; exit 2; }
rm -rf build  # a stale build/lib can smuggle deleted files into a wheel
"$PYTHON" -m build --outdir "$outdir" ${args[@]+"${args[@]}"} .
"$PYTHON" packaging/check_dist.py "$outdir"
