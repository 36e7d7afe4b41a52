"""What an attention worker tells Serve's request router, defined once for both sides. Kept apart
from `cluster_messages` because Serve imports the request router in its controller and proxy,
which must not load torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """What an attention worker hands Serve's request router through `record_routing_stats`:
    its engine's RSA runs and their calls in flight. An RSA run is one request to Serve but up
    to n calls in the engine; the router counts the difference as load."""

    rsa_calls: int = 0
    rsa_runs: int = 0

    def metrics(self) -> dict[str, float]:
        """Serve's form: a dict of floats."""
        return {"rsa_calls": float(self.rsa_calls), "rsa_runs": float(self.rsa_runs)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float] | None) -> RoutingStats:
        """Back from Serve's form; a replica that has reported nothing yet has none."""
        m = metrics or {}
        return cls(int(m.get("rsa_calls", 0)), int(m.get("rsa_runs", 0)))

    @property
    def extra_calls(self) -> int:
        """Engine calls Serve does not see as requests."""
        return max(0, self.rsa_calls - self.rsa_runs)
