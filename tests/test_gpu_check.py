"""bench/gpu_check.sh --dry-run: the GPU check's every step, at toy sizes on the CPU (Triton's
interpreter, the re-running graph capture), so the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "ZAYASERVE_KERNELS", "ZAYASERVE_KERNEL_BACKEND")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path),
                           "--dry-run"], env={**env, "PYTHON": sys.executable}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = [line.split()[0] for line in summary.splitlines()]
    assert steps == ["pytest_gpu", "kernels", "decode_triton", "decode_torch"]
    assert all(" rc=0 " in line for line in summary.splitlines())
    assert "6 passed" in (tmp_path / "pytest_gpu.log").read_text()
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["ok"] and kernels["complete"]
    for kernels in ("triton", "torch"):
        rows = json.loads((tmp_path / f"decode_{kernels}.json").read_text())
        assert rows and {r["kernels"] for r in rows} == {kernels}
        assert {r["graphs"] for r in rows} == {True, False}
    assert "cpu" in (tmp_path / "machine.txt").read_text()
