#!/usr/bin/env bash
# Installs zayaserve and what it needs into a virtual environment (idempotent).
#   bash deploy/install.sh                 into ./.venv (the repository's), no extras: builds
#                                          the wheel and installs it (what users get from pip)
#   EXTRAS=test bash deploy/install.sh     editable, with the test dependencies (development)
#   VENV=/tmp/env bash deploy/install.sh   into another venv (created if missing)
# Prints nothing but errors; afterwards use $VENV/bin/zayaserve or `source $VENV/bin/activate`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
case "$venv" in /*) ;; *) venv=$PWD/$venv ;; esac  # relative to the caller's directory
cd "$root"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
PY=$venv/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch first: otherwise pip resolves torch to a multi-GB CUDA build.
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
if [ -n "${EXTRAS:-}" ]; then
  "$PY" -m pip install -q -e ".[${EXTRAS}]"
  exit 0
fi
# What ships: a wheel, installed non-editable. A stale build/ folder could carry modules that
# no longer exist into the wheel, so it goes first.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
rm -rf "$root/build"
"$PY" -m pip wheel -q --no-deps -w "$wheels" "$root"
rm -rf "$root/build"
"$PY" -m pip uninstall -q -y zayaserve >/dev/null 2>&1 || true
"$PY" -m pip install -q "$wheels"/zayaserve-*.whl
