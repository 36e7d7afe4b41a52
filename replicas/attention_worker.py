"""The AttentionWorker deployment: the engine with the attention side of the model, whose
experts are reached through the token router over gRPC.

The token router runs on its own asyncio loop thread inside `RemoteExpertBackend` (the engine
thread blocks on it, releasing the GIL, so the other micro-batch can compute). A poller keeps the
placement map fresh, so new shard addresses (restarts, later migrations) are used without
restarting this replica. Every call to a shard carries the deployment's RPC token (`rpc_token`,
from `build_app`'s bind arguments) and stays within the shards' message cap.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from zayaserve.replicas.cluster_messages import (
    AutoscalingReport,
    PlacementUpdate,
    WorkerAnswer,
    WorkerReport,
)
from zayaserve.replicas.engine.async_engine import AsyncLLMEngine, EngineDeadError
from zayaserve.replicas.engine.config import EngineConfig, EngineSettings
from zayaserve.replicas.engine.gc_freeze import freeze_startup_objects
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.resume import Resume
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.replicas.observability.tracing import TracingConfig
from zayaserve.replicas.observability.tracing import configure as configure_tracing
from zayaserve.replicas.observability.tracing import flush as flush_traces
from zayaserve.replicas.routing_stats import RoutingStats
from zayaserve.replicas.rsa.events import RSAEvent, RSAJob
from zayaserve.replicas.rsa.serving import engine_rsa_events, rsa_gate, rsa_limits
from zayaserve.router.placement import PlacementMap
from zayaserve.router.remote_experts import RemoteExpertBackend
from zayaserve.router.tensor_codec import MAX_MESSAGE_BYTES

log = logging.getLogger("zayaserve.attention_worker")
POLL_S = 0.5


class PlacementHolder:
    """The map this worker routes by. A map replaces it only if newer by its order: an
    older one (an answer from a controller replica Serve is replacing, or one delayed in
    flight) is refused, never adopted over a newer one."""

    def __init__(self, num_experts: int) -> None:
        self.map = PlacementMap(version=-1, num_experts=num_experts, replicas={}, addresses={})
        self.order: tuple[int, int] = (-1, -1)
        self.refused = 0  # older maps offered and ignored

    def offer(self, update: PlacementUpdate) -> bool:
        """True if `update` was adopted (newer than the one held)."""
        order = update.order
        if order <= self.order:
            if order < self.order:
                self.refused += 1
                log.warning("placement map %s refused: older than the %s held", order,
                            self.order)
            return False
        self.map, self.order = update.routing_map(), order
        return True


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
class AttentionWorker:
    def __init__(self, controller: Any, model: str, engine_settings: EngineSettings,
                 max_pending_requests: int = 256, dispatch_deadline_s: float = 10.0,
                 wait_for_replica_s: float = 60.0, remote_experts: bool = True, *,
                 rpc_token: str | None = None,
                 shard_max_message_bytes: int = MAX_MESSAGE_BYTES,
                 tracing: dict[str, Any] | None = None) -> None:
        configure_tracing(TracingConfig(**(tracing or {})), "attention_worker")
        self.controller = controller
        self.replica = serve.get_replica_context().replica_id.unique_id
        path: Path = resolve_model(model)
        num_experts = ZayaConfig.from_pretrained(path).num_experts
        self._placement = PlacementHolder(num_experts)
        self._stop = threading.Event()
        self.desired_workers: float | None = None  # from the controller's answers
        self.experts: RemoteExpertBackend | None = None  # None: experts in this process
        if remote_experts:
            threading.Thread(target=self._poll_placement, daemon=True,
                             name="zayaserve-placement").start()
            self.experts = RemoteExpertBackend(lambda: self._placement.map, num_experts,
                                               deadline_s=dispatch_deadline_s,
                                               wait_for_replica_s=wait_for_replica_s,
                                               token=rpc_token,
                                               max_message_bytes=shard_max_message_bytes)
        engine = LLMEngine(EngineConfig(model=str(path), **engine_settings.model_dump()),
                           experts=self.experts)
        self.engine = AsyncLLMEngine(engine, max_pending_requests)
        freeze_startup_objects()  # keeps full collections off the step loop (gc_freeze.py)
        # The controller sums every worker's stats, with or without expert shards.
        threading.Thread(target=self._report_stats, daemon=True,
                         name="zayaserve-stats").start()

    def _poll_placement(self) -> None:
        while not self._stop.is_set():
            try:
                update = self.controller.placement.remote(self._placement.order).result(
                    timeout_s=10)
                if update is not None:  # None: the map held is the newest
                    self._placement.offer(update)
            except Exception as err:  # keep the last map; the token router retries
                log.warning("placement poll failed: %r", err)
            time.sleep(POLL_S)

    def _report_stats(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0)
            try:
                answer: WorkerAnswer = self.controller.report_worker.remote(
                    self.replica, self.report()).result(timeout_s=10)
                self.desired_workers = float(answer.desired_workers)
            except Exception as err:
                log.warning("stats report failed: %r", err)

    def report(self) -> WorkerReport:
        """This worker's numbers for the controller (and, summed, for /metrics)."""
        router = self.experts.router if self.experts is not None else None
        engine = self.engine.engine
        return WorkerReport(engine.engine_stats(), self.engine.steps,
                            router.stats.snapshot() if router else None,
                            router.latency_histogram() if router else None,
                            engine.latency_percentiles())

    def describe(self) -> dict[str, Any]:
        e = self.engine.engine
        return {"max_model_len": e.max_model_len, "vocab_size": e.model_config.vocab_size,
                "placement_version": self._placement.map.version,
                "placement_generation": self._placement.order[0], "replica": self.replica}

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None, trace_context: dict[str, str] | None = None,
        resume: Resume | None = None,
    ) -> AsyncIterator[StepDelta]:
        """`resume`: the request moved here from a worker that died (`engine.resume`)."""
        async for delta in self.engine.generate(request_id, prompt_token_ids, params, prompt,
                                                trace_context, resume=resume):
            yield delta

    async def rsa(self, job: RSAJob,
                  trace_context: dict[str, str] | None = None) -> AsyncIterator[RSAEvent]:
        """A whole Markovian RSA run in this replica's engine (its calls batch together and
        share cached prefixes); closing the stream (client gone) aborts every call."""
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise ValueError("rsa: this checkpoint has no tokenizer")
        async for event in engine_rsa_events(self.engine, tokenizer, job, trace_context,
                                             rsa_limits(self.engine.engine.config.limits)):
            yield event

    def record_routing_stats(self) -> dict[str, float]:
        """Serve's hook for the request router: an RSA run is one request to Serve but many
        calls in the engine; the router counts the calls (replicas/serve_request_router.py)."""
        gate = rsa_gate(self.engine)
        return RoutingStats(gate.calls, gate.runs).metrics()

    def stats(self) -> dict[str, Any]:
        """`report()` flat, under the /metrics names (for operators and tests)."""
        return self.report().samples()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook: the worker count the placement controller wants (Serve's policy for
        this deployment follows it; the controller reads the load from `report`s)."""
        return AutoscalingReport(desired_workers=self.desired_workers).metrics()

    def check_health(self) -> None:
        """Serve calls this periodically: a dead engine makes the replica unhealthy, and Serve
        replaces it (a dead engine would otherwise answer fastest and draw the most traffic)."""
        if self.engine.is_dead:
            raise EngineDeadError("engine loop is dead; this replica must be replaced")

    def health(self) -> bool:
        """For the ingress's /health and gRPC health: raises like check_health."""
        self.check_health()
        return True

    def __del__(self) -> None:
        self._stop.set()
        self.engine.shutdown()
        flush_traces()
        if self.experts is not None:
            with contextlib.suppress(Exception):  # the replica is going away regardless
                self.experts.close()
