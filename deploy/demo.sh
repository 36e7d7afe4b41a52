#!/usr/bin/env bash
# The main job on a fresh machine: install, then serve the built-in tiny demo model on an
# embedded local Ray (REST on :8000, gRPC on :9000; Ctrl-C stops it). Extra flags pass through,
# e.g. `bash deploy/demo.sh --expert-shards 2 --expert-replication 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
exec .venv/bin/zayaserve serve --model tiny "$@"
