"""bench/kernels.py on the CPU: `--dry-run` runs every Triton kernel (interpreted) against its
torch reference at toy shapes, checks they match and writes the JSON a GPU script collects; the
harness reports a wrong or crashing kernel as a mismatch and exits 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from zayaserve.bench.kernel_report import Mode, Report, Row, compare, run_pair

OPS = {"fused_moe", "paged_attention", "cca_decode", "kv_quantize"}


def test_dry_run_checks_and_times_every_kernel(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    # Without TRITON_INTERPRET (another test module may have set it in this process): the
    # bench must rerun itself with it set before triton is imported.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "zayaserve.bench.kernels", "--dry-run", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pairs match" in proc.stdout and "MISMATCH" not in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True and doc["ok"] is True and doc["complete"] is True
    assert doc["measured_gbs"] > 0
    results = doc["results"]
    assert {r["op"] for r in results} == OPS
    for r in results:
        assert r["ok"] is True and r["error"] is None, r
        assert r["triton_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] > 0, r
        assert 0 <= r["max_abs_err"] <= r["tol"], r  # kv_quantize: tol 0, bit-identical
        for key in ("op", "label", "hbm_frac", "hbm_frac_measured", "flops_frac"):
            assert key in r, key
        assert r["hbm_frac"] > 0 and r["hbm_frac_measured"] > 0, r
    assert any(r["flops_frac"] for r in results if r["op"] == "fused_moe")
    assert {t["target"].split()[0] for t in doc["targets"]} == {"fused_moe", "decode"}


def test_mismatch_and_crash_fail_the_run(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    report = Report(Mode(dry_run=True), peak_gbs=100.0, peak_tflops=1.0, measured_gbs=50.0,
                    json_path=str(path))
    a = torch.ones(4, 8)

    def good() -> torch.Tensor:
        return a * 2

    def wrong() -> torch.Tensor:
        return a * 2 + 1e-3

    def crash() -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    ok = run_pair(report, Row("op", "good", 4, tol=1e-4, nbytes=64), good, good,
                  lambda: compare(good(), good(), 1e-4))
    bad = run_pair(report, Row("op", "wrong", 4, tol=1e-4), wrong, good,
                   lambda: compare(wrong(), good(), 1e-4))
    boom = run_pair(report, Row("op", "crash", 4, tol=1e-4), crash, good,
                    lambda: compare(crash(), good(), 1e-4))
    assert ok.ok and ok.max_abs_err == 0 and ok.triton_ms > 0
    assert not bad.ok and math.isclose(bad.max_abs_err, 1e-3, rel_tol=1e-3)
    assert not boom.ok and "kernel exploded" in (boom.error or "")
    partial = json.loads(path.read_text())  # written after every row
    assert len(partial["results"]) == 3 and partial["complete"] is False
    assert report.finish() == 1
    doc = json.loads(path.read_text())  # strict JSON: NaN times of the crashed row are null
    assert doc["ok"] is False and [r["ok"] for r in doc["results"]] == [True, False, False]
    assert doc["results"][2]["triton_ms"] is None
    # Tuples (CCA: q, k, v and the states) are compared element by element.
    err, same = compare((a, a * 3), (a, a * 3 + 0.5), 1e-4)
    assert err == 0.5 and not same
