"""The prefix-cache benchmark measures what it says: a fresh engine's L2 hit reads the prefix
from a real redis-server. (From 2026-11-29 to 2026-12-06 each of its engines made its own cache
secret and read nothing, and the bench printed cold prefills as L2 hits.)"""

from __future__ import annotations

import re
import subprocess
import sys


def test_every_l2_row_read_the_whole_prefix_from_redis() -> None:
    prefix = 64
    proc = subprocess.run(
        [sys.executable, "-m", "zayaserve.bench.prefix_cache", "--model", "tiny", "--prefix",
         str(prefix), "--suffix", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"TTFT L2 hit .* encoding (\w+) .* (\d+) tokens from Redis", proc.stdout)
    assert [(e, int(n)) for e, n in rows] == [(e, prefix) for e in ("none", "int8", "fp8")], (
        proc.stdout)
