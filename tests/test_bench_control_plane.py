"""The control-plane simulation runs end to end at a small scale: the real controller
deployment answers every report, poll and heartbeat, a resize commits, /metrics renders."""

from __future__ import annotations

from zayaserve.bench.control_plane import main, measure


def test_small_scale_measures_every_column(capsys) -> None:  # type: ignore[no-untyped-def]
    s = measure(workers=4, shards=4, seconds=1.0)
    assert s.cpu_per_s > 0 and s.baseline_cpu_per_s > 0
    assert s.map_bytes > 0 and s.map_sent_per_s == 0  # steady state: no map resent
    assert s.commit_s is not None and 0 < s.commit_s < 60
    assert s.metrics_bytes > 1000 and s.memory_mb > 0
    main(["--seconds", "1", "--scales", "2x2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 2 |")]
    assert len(rows) == 1 and rows[0].count("|") == 13
