"""The chaos benchmark's arithmetic on made-up arrival times (its run on a real multi-node Ray
is tests/test_migration_e2e.py): recovery is the first window back at 80% of the rate before
the fault; the settings each fault runs under; the with/without-migration line."""

from __future__ import annotations

import pytest

from zayaserve.bench.chaos import ORDER, deployment, summarize
from zayaserve.bench.chaos_load import Load, recovery_s


def _load(times: list[float]) -> Load:
    load = Load("http://unused", [], 8)
    load.chunks.extend(times)
    return load


def test_recovery_is_the_first_window_back_at_80_percent() -> None:
    # 10 chunks/s until t=10, nothing for 4 s, 5/s for 2 s, then 10/s again.
    times = [i / 10 for i in range(100)] + [14 + i / 5 for i in range(10)] + [
        16 + i / 10 for i in range(100)]
    load = _load(times)
    assert load.rate(0, 10) == pytest.approx(10)
    rec = recovery_s(load, 10.0, 10.0, 26.0)
    assert rec is not None and 5.0 <= rec <= 6.5  # [t, t+3) first holds >= 24 chunks there
    assert recovery_s(load, 10.0, 10.0, 13.0) is None  # not back before the end
    assert recovery_s(_load([]), 0.0, 1.0, 10.0) is None


def test_each_fault_says_what_it_runs_under() -> None:
    assert deployment("worker-kill") == {"expert_replication": 2, "migration_limit": 3}
    assert deployment("attention-node-no-migration")["migration_limit"] == 0
    assert deployment("shard-kill-r1")["expert_replication"] == 1
    # The redeploys come last, so one deployment serves every fault before them.
    changes = [i for i in range(1, len(ORDER)) if deployment(ORDER[i]) != deployment(ORDER[i - 1])]
    assert changes == [ORDER.index("worker-kill-no-migration"), ORDER.index("shard-kill-r1")]


def test_the_summary_compares_failures_with_and_without_migration(
        capsys: pytest.CaptureFixture[str]) -> None:
    common = {"requests": 40, "in_flight_at_fault": 16, "changed": 0, "recovery_s": 1.5,
              "after_recovery_exact": True, "after_recovery": 20}
    summarize([{**common, "fault": "attention-node", "failed": 0, "migrations": 8.0},
               {**common, "fault": "attention-node-no-migration", "failed": 7,
                "failed_by_cause": {"in-band service_unavailable": 7}, "migrations": None}])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2] == "| attention-node | 40 | 16 | 0 | 0 | 0 | 8 | 1.5 | yes (20) |"
    assert lines[3] == ("| attention-node-no-migration | 40 | 16 | 7 (7 in-band "
                        "service_unavailable) | 0 | 0 | - | 1.5 | yes (20) |")
    assert lines[-1] == (
        "attention-node: 0 of 16 in-flight requests failed with migration, 7 of 16 without")
