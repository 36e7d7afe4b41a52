"""The placement controller's logic, free of Serve so it can be unit tested: the expert
placement and its epochs (`placement_state`), resize operations (`scale_ops`), the stats every
worker and shard reports, and, each tick, the autoscaler's decision for both pools and the EPLB
rebalance.

The autoscaler is one policy for the whole application: it reads the attention workers' queues
and KV usage and the shards' queued rows and rows/s, and decides both counts together (with the
attention:expert ratio). Its decisions become resize operations like a hand-made one, so a shard
count change is always two-phase. Serve's own per-deployment policies only follow the counts
decided here (the replicas report them back through `record_autoscaling_stats`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from zayaserve.cluster.control.autoscale_policy import (
    PolicyState,
    ShardSample,
    WorkerSample,
    decide,
)
from zayaserve.cluster.control.desired_counts import DesiredCounts
from zayaserve.cluster.control.elastic_config import AutoscalingConfig, EplbConfig, pool_bounds
from zayaserve.cluster.control.eplb import moves, should_rebalance
from zayaserve.cluster.control.ingress_totals import IngressTotals
from zayaserve.cluster.control.placement_state import ExpertPlacement
from zayaserve.cluster.control.scale_ops import ScaleError, ScaleOperations, ScaleRefused
from zayaserve.cluster.control.worker_totals import WorkerTotals
from zayaserve.replicas.cluster_messages import (
    ShardAnswer,
    ShardReport,
    WorkerAnswer,
    WorkerReport,
)

WORKER_SEEN_S = 3.0  # a worker that reported within this long is live


def _replicas(assignment: dict[str, list[int]], num_experts: int) -> dict[int, list[str]]:
    return {e: [s for s, held in assignment.items() if e in held] for e in range(num_experts)}


def _observed(p: ExpertPlacement) -> float | None:
    """Mean / max of the rows/s each serving shard reports (None: no traffic yet)."""
    rates = [p.load.slot_rate(s) for s, slot in p.slots.items() if slot.serving]
    return sum(rates) / len(rates) / max(rates) if rates and max(rates) > 0 else None


class ControllerState:
    def __init__(self, num_experts: int, num_shards: int, replication: int,
                 attention_workers: int = 1, autoscaling: AutoscalingConfig | None = None,
                 eplb: EplbConfig | None = None, heartbeat_timeout_s: float = 4.0,
                 grace_s: float = 3.0, max_experts_per_shard: int | None = None) -> None:
        self.autoscaling = autoscaling or AutoscalingConfig()
        self.max_experts_per_shard = max_experts_per_shard
        self.eplb = eplb or EplbConfig()
        self.desired = DesiredCounts(num_shards, attention_workers)  # resize operations write
        self.placement = ExpertPlacement(num_experts, num_shards, replication,
                                         heartbeat_timeout_s, grace_s, self.eplb.window_s,
                                         self.desired)
        if self.eplb.enabled:
            self.placement.eplb_redundant = self.eplb.redundant_experts
        shard_bounds, worker_bounds = pool_bounds(self.autoscaling, attention_workers,
                                                  num_shards, replication)
        self.ops = ScaleOperations(self.placement, shard_bounds, worker_bounds,
                                   self.live_workers)
        # What the deployment was configured with: a stored state of another config is not
        # resumed (its slots and counts would not fit).
        self.config = {"num_experts": num_experts, "num_shards": num_shards,
                       "replication": replication, "attention_workers": attention_workers}
        self.workers = WorkerTotals(live_s=WORKER_SEEN_S)  # their latest stats, and sums
        self.ingress = IngressTotals()  # the ingress replicas' migration counts
        self.shard_reports: dict[str, ShardReport] = {}  # slot -> its latest heartbeat
        self.policy = PolicyState()
        self.last_decision: tuple[str, ...] = ()
        self.last_rebalance: float | None = None  # the first tick starts the clock
        self.rebalances = 0
        self.last_gain: float | None = None

    # ----- shards ---------------------------------------------------------------------------
    def heartbeat(self, replica: str, slot: str, report: ShardReport | None,
                  now: float) -> ShardAnswer:
        """The shard's report; the answer says what it must hold and how many shards Serve
        should run (the shard hands that number to Serve's policy)."""
        p = self.placement
        ok = p.heartbeat(replica, slot, report.held if report else None, now)
        if ok and report is not None:
            self.shard_reports[slot] = report
            p.load.add(slot, replica, report.tokens, now)
        return ShardAnswer(ok, tuple(p.hold(slot, now)), self.desired.shards)

    def shard_budget(self) -> int | None:
        """The most experts one shard may hold: the configured cap, and what each serving
        shard reports it can hold in its memory (None: no bound known)."""
        serving = {s for s, slot in self.placement.slots.items() if slot.serving}
        caps = [r.capacity_experts for s, r in self.shard_reports.items()
                if s in serving and r.capacity_experts is not None]
        if self.max_experts_per_shard is not None:
            caps.append(self.max_experts_per_shard)
        return min(caps) if caps else None

    # ----- workers --------------------------------------------------------------------------
    def report_worker(self, replica: str, report: WorkerReport, now: float) -> WorkerAnswer:
        self.workers.report(replica, report, now)
        return WorkerAnswer(self.desired.workers)

    def live_workers(self, now: float) -> int:
        return len(self.workers.live(now))

    # ----- the tick -------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        p = self.placement
        p.expire(now)
        p.reconcile(now)
        self.ops.advance(now)
        if self.autoscaling.enabled and not self.ops.busy():
            self._autoscale(now)
        if self.last_rebalance is None or sum(p.load.load()) <= 0:
            self.last_rebalance = now  # weighed `interval_s` after traffic (re)starts
        if self.eplb.enabled and p.slots and not self.ops.busy() and p.pending is None \
                and now - self.last_rebalance >= self.eplb.interval_s:
            self.last_rebalance = now
            self._rebalance()

    def _autoscale(self, now: float) -> None:
        workers = [WorkerSample.from_engine(r.engine, r.latency) for r in self.workers.live(now)]
        p = self.placement
        shards = [ShardSample(float(r.queue_rows if (r := self.shard_reports.get(s)) else 0),
                              p.load.slot_rate(s))
                  for s, slot in p.slots.items() if slot.serving]
        cur_workers, cur_shards = self.desired.workers, self.desired.shards
        config = self.autoscaling
        if not p.slots:  # experts inside the workers: only the worker pool scales
            config = config.model_copy(update={"expert_shards": config.expert_shards.model_copy(
                update={"min": 0, "max": 0})})
        d = decide(config, cur_workers, cur_shards, workers, shards, self.policy, now)
        self.last_decision = d.reasons
        new_workers = d.attention_workers if d.attention_workers != cur_workers else None
        new_shards = d.expert_shards if p.slots and d.expert_shards != cur_shards else None
        if new_workers is not None or new_shards is not None:
            # A decision outside the resize bounds (ScaleError) keeps the counts.
            # So does one that would overfill a shard (ScaleRefused).
            with contextlib.suppress(ScaleError, ScaleRefused):
                self.ops.start(new_shards, new_workers, now, time.time(), self.shard_budget(),
                               reason="autoscaler: " + "; ".join(d.reasons))

    def _rebalance(self) -> None:
        p = self.placement
        load = p.load.load()
        members = p.members()
        if sum(load) <= 0 or len(members) < 2:
            return
        proposed = p.plan(members, p.replication, True)
        current = _replicas({s: p.committed.get(s, []) for s in members}, p.num_experts)
        new = _replicas(proposed, p.num_experts)
        gain_ok = should_rebalance(load, current, new, members, self.eplb.min_gain,
                                   self.eplb.move_cost)
        if gain_ok:
            self.rebalances += 1
            p.propose(proposed, f"eplb: {moves(current, new)} expert copies moved")

    # ----- what outlives the controller's replica (controller_store) ------------------------
    def snapshot(self, now: float, wall: float) -> dict[str, Any]:
        # The counts also under their earlier keys, which the previous release reads back
        # (a rollback must not find a snapshot it cannot restore).
        placement = {**self.placement.snapshot(), "desired": self.desired.shards}
        ops = {**self.ops.snapshot(now, wall), "desired_workers": self.desired.workers}
        return {"config": self.config, "placement": placement,
                "desired": self.desired.snapshot(), "ops": ops, "rebalances": self.rebalances}

    def restore(self, d: dict[str, Any], now: float, wall: float, generation: int,
                resume: bool = True) -> str:
        """Takes `snapshot()` back in a restarted controller; says what it did. `resume`
        False (another deployment of the app stored it) or another config: only the map
        version carries over, so that the routers' versions still only grow."""
        p = self.placement
        version = int(d.get("placement", {}).get("version", -1))
        if not resume or d.get("config") != self.config:
            p.version = max(p.version, version + 1)
            return f"a fresh placement (stored state of another deployment); version {p.version}"
        p.restore(d["placement"], now)
        self.desired.restore(d.get("desired") or {  # stored by a release before DesiredCounts
            "shards": d["placement"]["desired"],
            "workers": d.get("ops", {}).get("desired_workers") or self.desired.workers})
        self.ops.restore(d.get("ops", {}), now, wall, generation)
        self.rebalances = int(d.get("rebalances", 0))
        # A new generation's first map: numbered past anything the old one showed.
        p.version += 1
        op = self.ops.current
        return (f"resumed epoch {p.epoch}, version {p.version}, {len(p.slots)} slots, desired "
                f"shards {self.desired.shards}, workers {self.desired.workers}"
                + (f", operation {op.id} {op.phase}/{op.step}" if op else ""))

    # ----- what operators read ---------------------------------------------------------------
    def view(self, now: float) -> dict[str, Any]:
        """GET /v1/cluster/placement: epoch, each shard (state, experts, address), per-expert
        load, balancedness, and the change under way."""
        p = self.placement
        p.refresh(now)
        return {
            "epoch": p.epoch, "version": p.version, "num_experts": p.num_experts,
            "experts_in_workers": not p.slots, "shards": p.shard_views(now),
            "desired_shards": self.desired.shards if p.slots else 0,
            "attention_workers": self.live_workers(now),
            "desired_attention_workers": self.desired.workers,
            "pending": p.pending_reason if p.pending is not None else None,
            "rebalances": self.rebalances,
            "autoscaler": list(self.last_decision) if self.autoscaling.enabled else None,
            "operation": self.ops.current.id if self.ops.busy() and self.ops.current else None,
            "balancedness": p.load.balancedness(p.routing(), list(p.addresses())),
            "observed_balancedness": _observed(p),
            **p.load.view()}

    def stats(self, now: float) -> dict[str, Any]:
        """The workers' stats summed (`WorkerTotals`), the placement's, and shard counters."""
        total = self.workers.totals(now)
        total["attention_workers_live"] = self.live_workers(now)
        p = self.placement
        total["expert_shards_live"] = sum(1 for s in p.slots.values() if s.serving)
        total["placement_version"] = p.version
        total["placement_epoch"] = p.epoch
        total["eplb_rebalances_total"] = self.rebalances
        total.update(self.ingress.samples())
        total["expert_balancedness"] = _observed(p) or 0.0
        total["expert_load_rows_per_second"] = [
            {"expert": e, "value": rate} for e, rate in enumerate(p.load.load())]
        # Labelled samples (the metrics front end's shape): tokens each shard served per expert.
        total["expert_tokens_total"] = [
            {"shard": slot, "layer": layer, "expert": expert, "value": n}
            for slot, report in sorted(self.shard_reports.items()) if slot in p.slots
            for (layer, expert), n in sorted(report.tokens.items())]
        return total
