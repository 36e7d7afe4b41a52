"""The whole engine on the Triton kernels (Triton's CPU interpreter) reproduces transformers'
ZayaForCausalLM: fused MoE, paged attention and the CCA decode step all run as Triton, eagerly
and from decode graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_engine_on_triton_kernels_matches_transformers(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "ZAYASERVE_KERNELS": "triton"}
    script = Path(__file__).with_name("triton_engine_check.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env,
                          cwd=script.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernels"] == "triton"
    assert result["max_logprob_err"] < 1e-4
    assert result["greedy_equal"]
    assert result["graphs_greedy_equal"] and result["graph_buckets"]
