"""A Markovian RSA run on the offline engine (`LLM.rsa`): the synchronous `LLMEngine` driven
from an asyncio loop, so the same rounds code that serves the workers batches the round's calls
here too."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.rsa.events import RSAJob
from zayaserve.replicas.rsa.rounds import RSAResult
from zayaserve.replicas.rsa.serving import run_job


class _StepPump:
    """`generate` adds a call to the engine and yields its deltas; `pump` steps the engine
    while calls are unfinished and hands each delta to its call."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.queues: dict[str, asyncio.Queue[StepDelta]] = {}
        self.wake = asyncio.Event()

    async def generate(self, rid: str, ids: list[int], params: SamplingParams,
                       text: str | None) -> AsyncGenerator[StepDelta, None]:
        queue: asyncio.Queue[StepDelta] = asyncio.Queue()
        self.engine.add_request(rid, ids, params, prompt=text)  # raises for bad input
        self.queues[rid] = queue
        self.wake.set()
        finished = False
        try:
            while not finished:
                delta = await queue.get()
                finished = delta.finished
                yield delta
        finally:
            self.queues.pop(rid, None)
            if not finished:
                self.engine.abort_request(rid)

    async def pump(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests():
                self.wake.clear()
                await self.wake.wait()
                continue
            for delta in self.engine.step():
                queue = self.queues.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
            await asyncio.sleep(0)  # let the calls take their deltas and add the next ones


def run_offline(engine: LLMEngine, tokenizer: Tokenizer, job: RSAJob) -> RSAResult:
    async def main() -> RSAResult:
        pump = _StepPump(engine)
        stepping = asyncio.ensure_future(pump.pump())
        try:
            return await run_job(pump.generate, tokenizer, job)
        finally:
            stepping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stepping

    return asyncio.run(main())
