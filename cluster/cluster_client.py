"""The `EngineClient` over Ray Serve handles to the attention workers.

Workers stream the engine's `StepDelta`s unchanged, and this side passes them on.
Errors raised in a worker come back wrapped by Ray; they are unwrapped to the types the front
ends map to status codes (ValueError -> 400, EngineOverloadedError -> 429).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from zayaserve.cluster.engine_client import EngineClient
from zayaserve.replicas.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer

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
                 max_model_len: int) -> None:
        self.workers = workers
        self.controller = controller
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.in_flight = 0

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[StepDelta]:
        stream = self.workers.options(stream=True).generate.remote(
            request_id, prompt_token_ids, params, prompt)
        finished = False
        self.in_flight += 1
        try:
            async for delta in stream:
                finished = delta.finished
                yield delta
        except Exception as err:
            raise unwrap_remote_error(err) from err
        finally:
            self.in_flight -= 1
            if not finished:  # the client left: cancel in the worker, which frees the blocks
                stream.cancel()

    async def check_health(self) -> None:
        try:
            await self.workers.health.remote()
        except Exception as err:
            raise unwrap_remote_error(err) from err

    async def stats(self) -> dict[str, Any]:
        # The placement controller sums the stats every worker reports (shards or not).
        stats: dict[str, Any] = await self.controller.stats.remote()
        stats["ingress_requests_in_flight"] = self.in_flight
        return stats
