"""What the front ends (REST, gRPC) talk to: an `EngineClient` over whatever generates, in one
process an `AsyncLLMEngine` (`LocalEngineClient`), in the cluster the attention workers behind
Serve handles (`cluster_client.ClusterEngineClient`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer


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
    async def stats(self) -> dict[str, Any]:
        """Flat numeric stats for /metrics (names without the zayaserve_ prefix)."""

    @abstractmethod
    async def check_health(self) -> None:
        """Returns when a live engine can take requests; raises otherwise."""


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
        return self.engine.generate(request_id, prompt_token_ids, params, prompt)

    async def stats(self) -> dict[str, Any]:
        return await self.engine.run_on_engine(lambda engine: engine.stats())  # type: ignore[no-any-return]

    async def check_health(self) -> None:
        await self.engine.run_on_engine(lambda engine: None)  # raises once the engine is dead
