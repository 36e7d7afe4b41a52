#!/usr/bin/env bash
# The main job on a fresh machine: install, then serve the built-in tiny demo model.
# Until the Ray Serve cluster lands, this runs the same engine offline through the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
exec .venv/bin/zayaserve generate --model tiny --max-tokens 32 "${@:-Hello from zayaserve}"
