"""How many expert shards and attention workers Serve is asked to run: one object owns both.

Resize operations (`scale_ops`, started by an operator or by the autoscaler) are its only
writers. The placement reads the shard count (a slot beyond it is not refilled when its replica
dies); the controller's answers carry both counts to the replicas, which hand them to Serve's
follow-the-controller policy (`serve_autoscaling`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class DesiredCounts:
    shards: int
    workers: int

    def snapshot(self) -> dict[str, int]:
        return {"shards": self.shards, "workers": self.workers}

    def restore(self, d: Mapping[str, Any]) -> None:
        self.shards, self.workers = int(d["shards"]), int(d["workers"])
