#!/usr/bin/env bash
# The test command (README): installs everything on a fresh machine, lints, type-checks, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# Always ./.venv (whatever VENV says): it is the one the rest of this script uses. The plain
# install (no extras, as the README's demo gets it) is tested inside pytest, in a venv of its
# own: tests/test_plain_install.py.
VENV="$PWD/.venv" EXTRAS=test bash deploy/install.sh
# The prefix-cache tests start a real redis-server (Debian's package) on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
PY=$PWD/.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"  # console scripts used by the tests
"$PY" -m ruff check .
# mypy cannot follow the editable install's folder mapping; show it the root as `zayaserve`.
types_root=$(mktemp -d)
ln -s "$PWD" "$types_root/zayaserve"
(cd "$types_root" && MYPYPATH=. "$PY" -m mypy --config-file "$OLDPWD/pyproject.toml" \
  --cache-dir "$types_root/.mypy_cache" -p zayaserve)
rm -rf "$types_root"
"$PY" -m pytest -q -p no:cacheprovider "$@"
