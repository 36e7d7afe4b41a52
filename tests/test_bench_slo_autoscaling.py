"""The latency-target autoscaling simulation runs end to end on a short trace: the fixed
deployment is the smallest that meets the targets, the autoscaled ones grow under the peak."""

from __future__ import annotations

from zayaserve.bench.slo_autoscaling import main, run


def test_short_trace(capsys) -> None:  # type: ignore[no-untyped-def]
    targets = (1.0, 0.015)
    one = run("fixed 1", 120, 5, 30, 0, targets, fixed=1)
    assert one.finished > 500 and one.slo_met < 0.99  # one worker cannot carry the peak
    assert abs(one.replica_s - 120) < 0.1  # one replica, the whole trace
    main(["--seconds", "120"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]  # no header
    assert [r.split(" | ")[0] for r in rows] == [
        rows[0].split(" | ")[0], "| autoscaled, latency targets",
        "| autoscaled, queues and KV only"]
    assert rows[0].startswith("| fixed ") and "| 1.00x |" in rows[0]
    assert all(int(r.rstrip(" |").rsplit("| ", 1)[1]) >= 2 for r in rows[1:])  # they grew
