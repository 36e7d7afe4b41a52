#!/usr/bin/env bash
# The test command (README): installs everything on a fresh machine, lints, type-checks, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash deploy/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m mypy --config-file pyproject.toml -p zayaserve
"$PY" -m pytest -q -p no:cacheprovider "$@"
