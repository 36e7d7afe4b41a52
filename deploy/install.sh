#!/usr/bin/env bash
# Installs zayaserve and what it needs into ./.venv on a fresh machine (idempotent).
#   EXTRAS=test bash deploy/install.sh   also installs the test dependencies
# Prints nothing but errors; afterwards use .venv/bin/zayaserve or `source .venv/bin/activate`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch first: otherwise pip resolves torch to a multi-GB CUDA build.
if ! "$PY" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
"$PY" -m pip install -q -e "$spec"
