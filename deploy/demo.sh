#!/usr/bin/env bash
# The main job on a fresh machine: install, then serve the built-in tiny demo model on an
# embedded local Ray (REST on :8000, gRPC on :9000, Ray dashboard on :8265; Ctrl-C stops it).
# Extra flags pass through, e.g. `bash deploy/demo.sh --expert-shards 0 --no-dashboard`.
# VENV=path installs into (and runs from) another venv than ./.venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
case "$venv" in /*) ;; *) venv=$PWD/$venv ;; esac
cd "$root"
VENV=$venv bash deploy/install.sh
exec "$venv/bin/zayaserve" serve --model tiny "$@"
