#!/usr/bin/env bash
# The accelerator check, in one go: at most ~8 minutes on an H100/H200 (or MI300X), every result
# under OUT. On a machine without a GPU, --dry-run runs the same steps at toy sizes on the CPU
# (Triton's interpreter, the re-running graph capture); CI runs it that way.
#
#   bash bench/gpu_check.sh OUT [--dry-run]
#
# Steps (each with its own time limit, 8 minutes in all; one failing does not stop the others):
#   1. pytest -m gpu tests/test_gpu.py: fidelity on the device (fp32 1e-4 + greedy, bf16
#      tolerance), Triton kernels vs their torch references compiled, graphs on/off greedy
#   2. the compiled CCA decode kernel tests (tests/test_kernel_cca_decode.py, GPU only)
#   3. bench/kernels.py at ZAYA1-8B shapes -> OUT/kernels.json
#   4. bench/decode_e2e.py, random ZAYA1-8B weights made on the GPU, bf16, batch 1/16/64/256,
#      512-token prompts, graphs on/off, once per kernel set -> OUT/decode_<kernels>.json
# OUT/summary.txt lists each step's exit status; OUT/<step>.log holds its output.
#
# Python packages the GPU image lacks travel as wheels in .whl/ (bench/gpu_wheels.sh fetches
# them); they are installed into /tmp/site when present. The package itself is put on the path
# without installing it.
set -uo pipefail

out=${1:?usage: bash bench/gpu_check.sh OUT [--dry-run]}
dry=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$root"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$py" -c "import zayaserve" 2>/dev/null; then
    src=$(mktemp -d)
    ln -s "$root" "$src/zayaserve"
    export PYTHONPATH=$src${PYTHONPATH:+:$PYTHONPATH}
fi

flag=()
if [[ "$dry" == "--dry-run" ]]; then
    flag=(--dry-run)
    export ZAYASERVE_GPU_DRY_RUN=1 TRITON_INTERPRET=1
elif [[ -n "$dry" ]]; then
    echo "unknown option $dry (only --dry-run)" >&2
    exit 2
fi

: >"$out/summary.txt"
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, logs, records the status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.log"
}

{
    date -u +%FT%TZ
    (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || rocm-smi --showproductname || echo "no GPU tool") 2>/dev/null
    "$py" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda' if torch.cuda.is_available() else 'cpu',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step pytest_gpu 100 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
    --junitxml="$out/pytest_gpu.xml"
if [[ -z "$dry" ]]; then
    step pytest_cca_native 50 "$py" -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_kernel_cca_decode.py -k compiled
fi
step kernels 150 "$py" -m zayaserve.bench.kernels "${flag[@]}" --json "$out/kernels.json"
# (Under the interpreter a Triton step takes seconds: the dry run does one batch size.)
interpreted=()
[[ -n "$dry" ]] && interpreted=(--batches 1 --gen-len 2)
step decode_triton 120 env ZAYASERVE_KERNELS=triton "$py" -m zayaserve.bench.decode_e2e \
    "${flag[@]}" "${interpreted[@]}" --json "$out/decode_triton.json"
# The torch kernels for comparison, at fewer batch sizes (it is the slow path).
fewer=(--batches 1 64)
[[ -n "$dry" ]] && fewer=()
step decode_torch 60 env ZAYASERVE_KERNELS=torch "$py" -m zayaserve.bench.decode_e2e \
    "${flag[@]}" "${fewer[@]}" --json "$out/decode_torch.json"
! grep -v " rc=0 " "$out/summary.txt"
