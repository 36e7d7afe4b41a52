"""Runs an `LLMEngine` on its own thread and streams each request's outputs to asyncio callers.

The engine is single-threaded by design: every call into it happens on the loop thread, which
takes commands (add, abort) from a queue between steps and blocks when there is no work. The
engine's output thread (`output_thread`) turns each step's tokens into deltas and posts them
to the streams itself, so the loop goes on to the next step meanwhile.

Failure domains: a request's failure ends that request, a step's failure ends that step's
requests, and only `max_consecutive_step_failures` failed steps in a row (or the loop itself
dying) mark the engine dead. Cancelling a consumer at any point (before its request is added,
mid-step, after it finished) only aborts that request and frees its blocks.

Each request's outputs wait in a mailbox (`request_streams`) that holds at most one unread delta,
so a consumer that stops reading costs O(its output) and is eventually taken as gone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import Future
from typing import Any

from zayaserve.replicas.engine.admission import Admission, Reservation
from zayaserve.replicas.engine.admission import (  # re-exported: the front ends catch it
    EngineOverloadedError as EngineOverloadedError,
)
from zayaserve.replicas.engine.engine_errors import (  # re-exported: the front ends catch them
    EngineDeadError as EngineDeadError,
)
from zayaserve.replicas.engine.engine_errors import (
    RequestFailedError as RequestFailedError,
)
from zayaserve.replicas.engine.engine_errors import (
    StreamStalledError as StreamStalledError,
)
from zayaserve.replicas.engine.grammar import forbid_compiles
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.request_streams import RequestStreams
from zayaserve.replicas.engine.resume import Resume

log = logging.getLogger("zayaserve.engine")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_pending_requests: int = 256,
                 max_consecutive_step_failures: int = 3, max_unread_steps: int = 4096) -> None:
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self.max_consecutive_step_failures = max_consecutive_step_failures
        self.max_unread_steps = max_unread_steps
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._streams = RequestStreams(self._lock, max_unread_steps, self._abort_on_loop)
        self._admission = Admission(max_pending_requests, self._lock)
        self._stopped = threading.Event()
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self.steps = 0
        self.failed_steps = 0
        self._failures_in_a_row = 0
        if engine.output_thread is not None:  # its deltas go out from the output thread
            engine.output_thread.sink = self._deliver_deltas
        self._thread = threading.Thread(target=self._loop, name="zayaserve-engine", daemon=True)
        self._thread.start()

    # ---- the loop thread -----------------------------------------------------------------

    def _loop(self) -> None:
        forbid_compiles()  # grammars are compiled before their request reaches this thread
        try:
            while not self._stopped.is_set() and self._error is None:
                self._run_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as err:  # a bug in the loop itself: fail every waiter, never hang
            log.exception("engine loop died")
            self._die(err)

    def _run_commands(self, block: bool) -> None:
        try:
            self._commands.get(timeout=0.1)() if block else self._commands.get_nowait()()
            while True:
                self._commands.get_nowait()()
        except queue.Empty:
            pass

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:
            self._on_step_failure(err)
            return
        self.steps += 1
        self._failures_in_a_row = 0
        self._deliver_deltas(outputs)

    def _deliver_deltas(self, deltas: list[StepDelta]) -> None:
        self._streams.deliver([(d.request_id, d, d.finished) for d in deltas])

    def _on_step_failure(self, err: Exception) -> None:
        """Ends the failed step's requests (all requests, if the step failed before it knew
        them); the engine goes on unless steps keep failing for reasons of its own."""
        self.failed_steps += 1
        retryable = bool(getattr(err, "retryable", False))
        victims = self.engine.last_step_request_ids
        if victims is None:
            victims = set(self.engine.requests)
        log.error("engine step failed (%s) for requests %s", type(err).__name__,
                  sorted(self._streams.labels(victims)), exc_info=err)
        failure = RequestFailedError(
            f"the engine step serving this request failed ({type(err).__name__})",
            type(err).__name__, retryable)
        if self.engine.output_thread is not None:
            self.engine.output_thread.join()  # their earlier deltas go out before the error
        for rid in victims:
            self.engine.abort_request(rid)
        self._streams.deliver([(rid, failure, True) for rid in victims])
        if not retryable:  # an expert shard being away is not this engine's fault
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= self.max_consecutive_step_failures:
                self._die(err)

    def _die(self, err: BaseException) -> None:
        self._error = err
        dead = EngineDeadError(f"engine stopped after repeated failures ({type(err).__name__})")
        self._streams.deliver([(rid, dead, True) for rid in self._streams.ids()])

    def _abort_on_loop(self, request_id: str) -> None:
        # (called from the output thread too: the engine's own thread does the abort)
        self._call(functools.partial(self.engine.abort_request, request_id))

    def _call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Runs fn on the loop thread; the future carries its result or exception. A future
        cancelled before its turn is skipped: its caller is gone and wants nothing done."""
        fut: Future[Any] = Future()

        def command() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                result = fn()
            except Exception as err:
                fut.set_exception(err)
            else:
                fut.set_result(result)

        self._commands.put(command)
        return fut

    # ---- the asyncio side ----------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self._error is not None or not self._thread.is_alive()

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    def reserve(self, slots: int) -> Reservation:
        """Holds `slots` queue slots for a group of requests admitted together, or raises
        EngineOverloadedError now, before any of them has cost anything."""
        with self._lock:
            return self._admission.reserve(len(self._streams), slots)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        trace_context: Mapping[str, str] | None = None,
        reservation: Reservation | None = None,
        resume: Resume | None = None,
    ) -> AsyncGenerator[StepDelta, None]:
        """Yields the request's StepDeltas (their `request_id` is the caller's label); the
        deltas of steps the consumer fell behind on arrive merged into one. `trace_context`:
        W3C headers of the caller's span (a sampled one makes the engine trace the request);
        `reservation`: a slot of it is used instead of a free one while the request runs;
        `resume`: what the client already has of it (a migrated request, `resume`)."""
        if self.is_dead:
            raise EngineDeadError(f"engine stopped ({type(self._error).__name__})")
        rid = f"{next(self._ids)}"
        with self._lock:
            reserved = self._admission.admit(len(self._streams), reservation)
            stream = self._streams.open(rid, request_id)
        finished = False
        try:
            # Compiled once, now, off the step loop and within the compile limits; the request
            # holds it (its matchers never compile on the loop).
            grammar = await self.engine.grammars.compile_async(params.structured_outputs)
            await asyncio.wrap_future(self._call(
                lambda: self.engine.add_request(rid, prompt_token_ids, params, prompt,
                                                trace_context, grammar, resume)))
            while not finished:
                await stream.wake.wait()
                stream.wake.clear()
                item, stream.latest, stream.unread = stream.latest, None, 0
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item is None:
                    continue
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away, or add failed: free what it holds
                self._abort(rid)
            if reserved:
                assert reservation is not None
                self._admission.give_back(reservation)

    def _abort(self, rid: str) -> None:
        self._streams.close(rid)
        self._call(lambda: self.engine.abort_request(rid))

    async def run_on_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Runs fn(engine) between steps (for stats and admin), returning its result."""
        if self.is_dead:
            raise EngineDeadError(f"engine stopped ({type(self._error).__name__})")
        return await asyncio.wrap_future(self._call(lambda: fn(self.engine)))

    def shutdown(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)
