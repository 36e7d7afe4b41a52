#!/usr/bin/env bash
# Installs zayaserve and what it needs into a virtual environment (idempotent).
#   bash deploy/install.sh                 into ./.venv (the repository's), no extras
#   EXTRAS=test bash deploy/install.sh     also installs the test dependencies
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
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
"$PY" -m pip install -q -e "$spec"
