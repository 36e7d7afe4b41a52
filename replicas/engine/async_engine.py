"""Runs an `LLMEngine` on its own thread and streams each request's outputs to asyncio callers.

The engine is single-threaded by design: every call into it happens on the loop thread, which
takes commands (add, abort) from a queue between steps and blocks when there is no work.
Cancelling a consumer (a client that disconnects) aborts its request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import RequestOutput
from zayaserve.replicas.engine.params import SamplingParams


class EngineOverloadedError(RuntimeError):
    """The bounded request queue is full: the caller should answer 429 / RESOURCE_EXHAUSTED."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; nothing more can be served by this replica."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_pending_requests: int = 256) -> None:
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="zayaserve-engine", daemon=True)
        self._thread.start()

    # ---- the loop thread -----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    if block:
                        self._commands.get(timeout=0.1)()
                    else:
                        self._commands.get_nowait()()
                    while True:
                        self._commands.get_nowait()()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.steps += 1
                    for out in outputs:
                        self._deliver(out.request_id, out, finished=out.finished)
        except BaseException as err:  # a dead loop must fail every waiter, never hang them
            self._error = err
            with self._lock:
                streams = list(self._streams)
            for rid in streams:
                self._deliver(rid, EngineDeadError(f"engine loop failed: {err!r}"), True)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, finished: bool):
        with self._lock:
            stream = self._streams.get(request_id)
            if finished:
                self._streams.pop(request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Runs fn on the loop thread; the future carries its result or exception."""
        fut: Future[Any] = Future()

        def command() -> None:
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)

        self._commands.put(command)
        return fut

    # ---- the asyncio side ----------------------------------------------------------------

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative output after every step that touched it."""
        if self._error is not None:
            raise EngineDeadError(f"engine loop failed: {self._error!r}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        with self._lock:
            if len(self._streams) >= self.max_pending_requests:
                raise EngineOverloadedError(
                    f"{len(self._streams)} requests in flight (max_pending_requests="
                    f"{self.max_pending_requests})")
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id!r} is already in flight")
            self._streams[request_id] = stream
        try:
            await asyncio.wrap_future(self._call(
                lambda: self.engine.add_request(request_id, prompt_token_ids, params, prompt)))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away (disconnect, cancel): free its blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._call(lambda: self.engine.abort_request(request_id))

    async def run_on_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) between steps (for stats and admin), returning its result."""
        return await asyncio.wrap_future(self._call(lambda: fn(self.engine)))

    def shutdown(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)
