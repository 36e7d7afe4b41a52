"""The end-to-end decode benchmark's dry run (CPU, random:tiny): rows for every batch and graph
setting, sane numbers, and the same greedy tokens with graphs (the CPU stand-in) and without."""

from __future__ import annotations

import json
from pathlib import Path

from zayaserve.bench.decode_e2e import main


def test_dry_run_writes_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["--dry-run", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["batch"], r["graphs"]) for r in rows} == {(1, True), (1, False), (4, True),
                                                         (4, False)}
    for r in rows:
        assert r["kernels"] == "torch" and r["prompt_len"] == 24 and r["decode_steps"] == 6
        for key in ("tok_s", "step_ms", "ttft_ms", "bytes_per_step", "copy_gbs"):
            assert r[key] > 0, key
        assert 0 < r["roofline_fraction"] < 1
        assert 0 <= r["distinct_experts"] <= min(r["batch"], 8)
        assert len(r["first_tokens"]) >= 1 + 3 + 6
    by = {(r["batch"], r["graphs"]): r for r in rows}
    for batch in (1, 4):
        assert by[batch, True]["first_tokens"] == by[batch, False]["first_tokens"]
        assert by[batch, True]["bytes_per_step"] > 0
    # More sequences read more K/V and states: a batch-4 step needs more bytes than batch 1.
    assert by[4, False]["bytes_per_step"] > by[1, False]["bytes_per_step"]
