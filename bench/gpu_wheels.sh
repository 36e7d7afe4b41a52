#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels that bench/gpu_check.sh needs on the GPU image
# (Python 3.12, which has torch, triton, tokenizers, safetensors, numpy but not these): the
# versions installed here, into .whl/ at the repository root (git ignores it).
#
#   bash bench/gpu_wheels.sh [PYTHON]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$root/.venv/bin/python}
pkgs=(pydantic pydantic-core annotated-types typing-inspection redis opentelemetry-api
      opentelemetry-sdk opentelemetry-semantic-conventions
      transformers huggingface-hub)
mkdir -p "$root/.whl"
for name in "${pkgs[@]}"; do
    version=$("$py" -m pip show "$name" 2>/dev/null | sed -n "s/^Version: //p" || true)
    [[ -n "$version" ]] || { echo "skip $name (not installed here)"; continue; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$root/.whl" "$name==$version"
done
du -sh "$root/.whl"
