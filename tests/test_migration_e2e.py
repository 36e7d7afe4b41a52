"""Request migration on a real multi-node Ray: the chaos benchmark's attention-node fault
(bench/chaos.py) in a subprocess of its own (its own Ray cluster: head, two attention nodes,
two expert nodes). 8 greedy and 8 seeded streaming clients run; a whole attention node (its
raylet and every process on it, the worker replica among them) is killed mid-stream. The
streams it held move to the other worker: none fails, and every answer, before and after, is
the offline engine's text for the same request."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_an_attention_node_lost_under_16_streams_fails_none_and_changes_none(
        tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zayaserve.bench.chaos", "--faults", "attention-node",
         "--clients", "16", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=900)
    finally:  # its Ray's processes are in its session: none outlives the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-6000:]
    [row] = json.loads(out.read_text())
    assert row["fault"] == "attention-node"
    assert row["failed"] == 0, row["failed_by_cause"]
    assert row["changed"] == 0
    # The node held streams when it went (each of its worker's moved), and load went on.
    assert row["migrations"] >= 1, row
    assert row["in_flight_at_fault"] >= 8, row
    assert row["requests"] > row["in_flight_at_fault"]
    assert row["after_recovery_exact"] and row["after_recovery"] >= 1, row
