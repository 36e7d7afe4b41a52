"""Structured-output compiles: once per request, off the engine thread, bounded in time and
number.

An xgrammar compile cannot be cancelled, and its time grows with the grammar's shape more than
its size (a few kilobytes of EBNF can take seconds). So a request's constraint is compiled when
the request arrives, on one of `max_workers` threads of its own, and the request waits for it
at most `limit_s` (`limits.max_grammar_compile_s`):
- a compile that has not finished `limit_s` after it started is the request's 400
  (`structured_outputs`); it goes on in the background, holding its worker until it ends (so
  the workers are few, `limits.max_concurrent_grammar_compiles`);
- a request whose compile found no free worker within `limit_s` is refused as overloaded
  (`EngineOverloadedError`, 429);
- requests with the same constraint compiling at once share one compile;
- the workers (and the compiler's threads they start) run at a lower CPU priority, so a long
  compile slows the engine's steps as little as the machine allows (xgrammar releases the GIL).
The request then holds its compiled grammar: every matcher of it (n > 1 children included) is
made from that, never by compiling again, so an entry the compiler's cache has since dropped
costs nothing; a compile on the engine's step thread is a bug that raises
(`grammar.no_compiles`).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from zayaserve.replicas.engine.admission import EngineOverloadedError
from zayaserve.replicas.engine.structured import StructuredOutputsParams
from zayaserve.replicas.validation_errors import ParamError

__all__ = ["CompilePool", "CompiledGrammar"]

_NICE = 10  # of the compile workers: above the engine's 0, so steps get the CPU first


@dataclass(frozen=True, slots=True, eq=False)
class CompiledGrammar:
    """A request's constraint and what it compiled to (xgrammar's CompiledGrammar)."""

    spec: StructuredOutputsParams
    compiled: Any


@dataclass(eq=False, slots=True)
class _Job:
    spec: StructuredOutputsParams
    started: Future[float] = field(default_factory=Future)  # time.monotonic() at its start
    done: Future[Any] = field(default_factory=Future)
    waiters: int = 0


class CompilePool:
    """Compiles on at most `max_workers` daemon threads (an abandoned compile must not hold
    the process at exit), one compile per distinct constraint in flight."""

    def __init__(self, compile_fn: Callable[[StructuredOutputsParams], Any], max_workers: int,
                 limit_s: float) -> None:
        self._compile_fn = compile_fn
        self.max_workers = max_workers
        self.limit_s = limit_s
        self._jobs: dict[StructuredOutputsParams, _Job] = {}
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Compiles queued or running (abandoned ones included)."""
        with self._lock:
            return len(self._jobs)

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Blocks the caller (never the engine thread) for at most about 2 x limit_s."""
        job = self._join(spec)
        try:
            try:
                started = job.started.result(timeout=self.limit_s)
            except TimeoutError:
                raise self._overloaded() from None
            try:
                remaining = started + self.limit_s - time.monotonic()
                return CompiledGrammar(spec, job.done.result(timeout=max(0.0, remaining)))
            except TimeoutError:
                raise self._too_slow(spec) from None
        finally:
            self._leave(job)

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """`compile` for an asyncio caller: waits without holding any thread."""
        job = self._join(spec)
        try:
            if not await _ready(job.started, self.limit_s):
                raise self._overloaded()
            remaining = job.started.result() + self.limit_s - time.monotonic()
            if not await _ready(job.done, remaining):
                raise self._too_slow(spec)
            return CompiledGrammar(spec, job.done.result())
        finally:
            self._leave(job)

    def _overloaded(self) -> EngineOverloadedError:
        return EngineOverloadedError(
            f"all {self.max_workers} grammar compile workers stayed busy for {self.limit_s:g} s "
            "(limits.max_concurrent_grammar_compiles)")

    def _too_slow(self, spec: StructuredOutputsParams) -> ParamError:
        return ParamError("structured_outputs", f"structured_outputs: compiling the "
                          f"{spec.kind} constraint exceeded the {self.limit_s:g} s limit "
                          "(limits.max_grammar_compile_s); simplify it")

    def _join(self, spec: StructuredOutputsParams) -> _Job:
        with self._lock:
            job = self._jobs.get(spec)
            if job is None:
                job = self._jobs[spec] = _Job(spec)
                self._queue.put(job)
                if len(self._workers) < self.max_workers:
                    worker = threading.Thread(target=self._work, daemon=True,
                                              name=f"zayaserve-grammar-{len(self._workers)}")
                    self._workers.append(worker)
                    worker.start()
            job.waiters += 1
            return job

    def _leave(self, job: _Job) -> None:
        with self._lock:
            job.waiters -= 1

    def _work(self) -> None:
        _yield_cpu()
        while True:
            job = self._queue.get()
            with self._lock:
                if job.waiters == 0:  # every request for it gave up while it queued
                    del self._jobs[job.spec]
                    continue
                job.started.set_result(time.monotonic())
            try:
                job.done.set_result(self._compile_fn(job.spec))
            except BaseException as err:  # the waiters get it (a ParamError: a bad grammar)
                job.done.set_exception(err)
            finally:
                with self._lock:
                    del self._jobs[job.spec]


def _yield_cpu() -> None:
    """This thread, and the threads it starts, give way to the engine's (Linux: a nice value
    is a thread's own and new threads inherit it)."""
    if sys.platform == "linux":
        with suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)


async def _ready(fut: Future[Any], timeout: float) -> bool:
    """Whether `fut` is done, waiting up to `timeout` s on the running loop. Unlike
    asyncio.wrap_future, a timeout never cancels `fut` (other requests may share it)."""
    if fut.done() or timeout <= 0:
        return fut.done()
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: Future[Any]) -> None:
        with suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, waiter)

    fut.add_done_callback(wake)
    with suppress(TimeoutError):
        await asyncio.wait_for(waiter, timeout)
    return fut.done()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
