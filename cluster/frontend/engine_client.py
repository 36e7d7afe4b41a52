"""What the front ends (REST, gRPC) talk to: an `EngineClient` over whatever generates, in one
process an `AsyncLLMEngine` (`LocalEngineClient`), in the cluster the attention workers behind
Serve handles (`ClusterEngineClient`).

Workers stream the engine's `StepDelta`s unchanged, and the cluster client passes them on.
Errors raised in a worker come back wrapped by Ray; they are unwrapped to the types the front
ends map to status codes (ValueError -> 400, EngineOverloadedError -> 429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from zayaserve.cluster.frontend.migration import (
    MigrationCounts,
    StreamProgress,
    movable,
    pause_s,
    seeded,
)
from zayaserve.cluster.frontend.request_tracker import current_trace_context
from zayaserve.replicas.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.rsa.events import RSADone, RSAEvent, RSAJob
from zayaserve.replicas.rsa.serving import engine_rsa_events, rsa_limits

log = logging.getLogger("zayaserve.ingress")


class EngineClient(ABC):
    """Contract: `generate` yields the request's `StepDelta`s (only what is new), the last one
    with `finished=True`; raises `ValueError` for bad input (the message names the field),
    `EngineOverloadedError` when its bounded queue is full. Closing the iterator early
    (client gone) cancels the request and frees its cache."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    @abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[StepDelta]: ...

    @abstractmethod
    def rsa(self, job: RSAJob) -> AsyncIterator[RSAEvent]:
        """A whole Markovian RSA run in one engine: its events (`RSADone` last). Raises like
        `generate`; closing the iterator early aborts every call of the run."""

    @abstractmethod
    async def stats(self) -> dict[str, Any]:
        """Flat numeric stats for /metrics (names without the zayaserve_ prefix)."""

    @abstractmethod
    async def check_health(self) -> None:
        """Returns when a live engine can take requests; raises otherwise."""

    async def placement(self) -> dict[str, Any]:
        """GET /v1/cluster/placement: one process holds every expert (no shards, no map)."""
        return {"epoch": 0, "num_experts": None, "experts_in_workers": True, "shards": [],
                "balancedness": None, "expert_load": None}


    async def scale(self, expert_shards: int | None,
                    attention_workers: int | None) -> dict[str, Any]:
        """POST /v1/cluster/scale: one process has nothing to resize."""
        return {"error": "invalid", "message": "expert_shards: this server runs one engine "
                "in its own process; resizing needs the Ray Serve cluster (zayaserve serve)"}

    async def operation(self, op_id: str) -> dict[str, Any] | None:
        return None


class LocalEngineClient(EngineClient):
    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.engine.max_model_len
        tok = engine.engine.tokenizer
        if tok is None:
            raise ValueError("model: serving needs a checkpoint with tokenizer.json")
        self.tokenizer = tok

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[StepDelta]:
        return self.engine.generate(request_id, prompt_token_ids, params, prompt,
                                    current_trace_context())

    def rsa(self, job: RSAJob) -> AsyncIterator[RSAEvent]:
        return engine_rsa_events(self.engine, self.tokenizer, job, current_trace_context(),
                                 rsa_limits(self.engine.engine.config.limits))

    async def stats(self) -> dict[str, Any]:
        return await self.engine.run_on_engine(lambda engine: engine.stats())  # type: ignore[no-any-return]

    async def check_health(self) -> None:
        await self.engine.run_on_engine(lambda engine: None)  # raises once the engine is dead


# What a worker raises on purpose, each with its own status code in the front ends.
_WORKER_ERRORS = (ValueError, EngineOverloadedError, EngineDeadError, RequestFailedError,
                  StreamStalledError)
# Ray's ways of saying that the worker replica itself is gone (crashed, being replaced).
_REPLICA_GONE = ("ActorDiedError", "RayActorError", "ActorUnavailableError",
                 "ActorUnschedulableError")


def unwrap_remote_error(err: BaseException) -> BaseException:
    """The exception a worker raised, an overload error for Serve's back-pressure, or an
    EngineDeadError for a worker replica that is gone."""
    name = type(err).__name__
    if name in ("BackPressureError", "DeploymentUnavailableError"):
        return EngineOverloadedError("the attention workers' queue is full")
    if name in _REPLICA_GONE:
        return EngineDeadError("the attention worker serving this request went away")
    cause = getattr(err, "cause", None) or err.__cause__
    seen = 0
    while cause is not None and seen < 5:
        if isinstance(cause, _WORKER_ERRORS):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
        seen += 1
    return err


class ClusterEngineClient(EngineClient):
    def __init__(self, workers: Any, controller: Any, tokenizer: Tokenizer, model_name: str,
                 max_model_len: int, migration_limit: int = 0,
                 replica_id: str = "ingress") -> None:
        self.workers = workers
        self.controller = controller
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.in_flight = 0
        self.migration_limit = migration_limit  # moves per request (`migration`)
        self.migrations = MigrationCounts()
        self.replica_id = replica_id  # this ingress replica's, for its reports
        self._reports: set[asyncio.Future[None]] = set()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[StepDelta]:
        can_move = movable(params, self.migration_limit)
        if can_move:
            params = seeded(params)
        progress, trace = StreamProgress(), current_trace_context()
        self.in_flight += 1
        try:
            while True:
                stream = self.workers.options(stream=True).generate.remote(
                    request_id, prompt_token_ids, params, prompt, trace, progress.resume())
                finished = False
                try:
                    async for delta in stream:
                        finished = delta.finished
                        yield progress.add(delta)
                    if progress.moves:
                        self.migrations.resumed += 1
                        self._report_migrations()
                    return
                except Exception as err:
                    error = unwrap_remote_error(err)
                    # A moved request that finds the other workers full waits its turn too.
                    if not isinstance(error, EngineDeadError) and not (
                            progress.moves and isinstance(error, EngineOverloadedError)):
                        raise error from err
                    if not can_move or progress.moves >= self.migration_limit:
                        self.migrations.failed += 1
                        self._report_migrations()
                        raise error from err
                finally:
                    if not finished:  # the client left: cancel in the worker (frees blocks)
                        stream.cancel()
                progress.moves += 1
                self.migrations.moved += 1
                self._report_migrations()
                await asyncio.sleep(pause_s(progress.moves))
        finally:
            self.in_flight -= 1

    async def rsa(self, job: RSAJob) -> AsyncIterator[RSAEvent]:
        # The whole run goes to one worker: its calls batch there and share its prefix cache.
        stream = self.workers.options(stream=True).rsa.remote(job, current_trace_context())
        finished = False
        self.in_flight += 1
        try:
            async for event in stream:
                finished = isinstance(event, RSADone)
                yield event
        except Exception as err:
            raise unwrap_remote_error(err) from err
        finally:
            self.in_flight -= 1
            if not finished:  # the client left: cancel the run in the worker
                stream.cancel()

    async def check_health(self) -> None:
        try:
            await self.workers.health.remote()
        except Exception as err:
            raise unwrap_remote_error(err) from err

    async def placement(self) -> dict[str, Any]:
        view: dict[str, Any] = await self.controller.view.remote()
        return view

    async def scale(self, expert_shards: int | None,
                    attention_workers: int | None) -> dict[str, Any]:
        answer: dict[str, Any] = await self.controller.scale.remote(expert_shards,
                                                                    attention_workers)
        return answer

    async def operation(self, op_id: str) -> dict[str, Any] | None:
        op: dict[str, Any] | None = await self.controller.operation.remote(op_id)
        return op

    def _report_migrations(self) -> None:
        """Sends the controller this replica's counts as they are now, in the background (one
        call per migration: they are rare); `stats` sends them again before it reads."""
        if self.controller is None:
            return
        task = asyncio.ensure_future(self._send_migrations())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _send_migrations(self) -> None:
        try:
            await self.controller.report_ingress.remote(self.replica_id,
                                                        dataclasses.replace(self.migrations))
        except Exception as err:  # the controller restarting: the next report has the counts
            log.warning("migration counts not reported (%s)", type(err).__name__)

    async def stats(self) -> dict[str, Any]:
        # The placement controller sums the stats every worker reports (shards or not) and the
        # migrations every ingress replica reports (they outlive the replica there).
        await self._send_migrations()
        stats: dict[str, Any] = await self.controller.stats.remote()
        stats["ingress_requests_in_flight"] = self.in_flight
        return stats
