"""Moving a request's `StepDelta`s from the engine client to the client's socket: opening
streams so that admission errors come before a 200, merging the streams of several prompts,
cancelling the engine's work whenever the client goes away, and REST's server-sent events
(chunks, in-band errors after a 200). The handlers' context is `serving_context`, usage
`usage`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.frontend_errors import (
    FrontendError,
    UnavailableError,
    as_frontend_error,
    internal_error,
)
from zayaserve.cluster.frontend.metrics import RequestTracker
from zayaserve.cluster.frontend.openai_protocol import ErrorDetail, ErrorResponse
from zayaserve.replicas.engine.outputs import RequestOutput, RequestOutputBuilder, StepDelta
from zayaserve.replicas.engine.params import SamplingParams

T = TypeVar("T")


SSE_DONE = b"data: [DONE]\n\n"


# ---- engine streams ------------------------------------------------------------------------


async def aclose_quietly(iterator: AsyncIterator[Any]) -> None:
    """Closes an engine client's iterator (which cancels its request) whatever state it is in."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def open_stream(
    client: EngineClient, request_id: str, prompt_ids: list[int], params: SamplingParams,
    prompt: str | None,
) -> tuple[StepDelta, AsyncIterator[StepDelta]]:
    """Starts a request and waits for its first delta, so that admission errors (overload, bad
    input) surface here, before a streaming response has committed to a 200."""
    iterator = client.generate(request_id, prompt_ids, params, prompt)
    try:
        first = await iterator.__anext__()
    except BaseException:
        await aclose_quietly(iterator)
        raise
    return first, iterator


async def open_streams(
    client: EngineClient, requests: Sequence[tuple[str, list[int], str | None]],
    params: SamplingParams,
) -> list[tuple[StepDelta, AsyncIterator[StepDelta]]]:
    """`open_stream` for several prompts at once; if any fails, the others are cancelled."""
    results = await asyncio.gather(
        *(open_stream(client, rid, ids, params, text) for rid, ids, text in requests),
        return_exceptions=True)
    opened = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for _, iterator in opened:
            await aclose_quietly(iterator)
        raise failed[0]
    return opened  # type: ignore[return-value]


async def merge_streams(
    streams: Sequence[tuple[StepDelta, AsyncIterator[StepDelta]]],
) -> AsyncGenerator[tuple[int, StepDelta], None]:
    """Yields (stream index, delta) from several opened streams as deltas arrive, first
    deltas first. Leaving early (a disconnect) cancels and closes every unfinished stream."""
    pending: dict[asyncio.Task[StepDelta], int] = {}

    def follow(i: int) -> None:
        task = asyncio.ensure_future(streams[i][1].__anext__())
        pending[task] = i

    try:
        for i, (first, _) in enumerate(streams):
            yield i, first
        for i, (first, _) in enumerate(streams):
            if not first.finished:
                follow(i)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                if not out.finished:
                    follow(i)
                yield i, out
    finally:
        # An iterator cannot be closed while a __anext__ on it is in flight: cancel those first.
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        for _, iterator in streams:
            await aclose_quietly(iterator)


async def close_streams(
    merged: AsyncIterator[tuple[int, StepDelta]] | None,
    opened: Sequence[tuple[StepDelta, AsyncIterator[StepDelta]]],
) -> None:
    """Closes a merge_streams iterator and, in case it never started (so its cleanup never
    ran), the streams it was given: every unfinished request is cancelled. Idempotent."""
    if merged is not None:
        await aclose_quietly(merged)
    for _, iterator in opened:
        await aclose_quietly(iterator)


async def collect(
    client: EngineClient, requests: Sequence[tuple[str, list[int], str | None]],
    params: SamplingParams, on_delta: Callable[[int, StepDelta], None] | None = None,
) -> list[RequestOutput]:
    """Runs several prompts to completion; returns each one's whole output, in order.
    on_delta(prompt index, delta) sees every delta (for metrics)."""
    builders = [RequestOutputBuilder(rid, text) for rid, _, text in requests]
    opened = await open_streams(client, requests, params)
    async with contextlib.aclosing(merge_streams(opened)) as deltas:
        async for i, delta in deltas:
            if on_delta is not None:
                on_delta(i, delta)
            builders[i].add(delta)
    final = [b.output for b in builders]
    if not all(out.finished for out in final):
        raise UnavailableError("the engine ended a request without finishing it")
    return final


# ---- server-sent events and disconnects ----------------------------------------------------


def error_response_of(err: FrontendError) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(
        message=err.message, type=err.error_type, param=err.param, code=err.code))


def stream_error_event(err: BaseException) -> bytes:
    """After a 200 has gone out, a failure can only be told in the stream itself."""
    try:
        frontend_err = as_frontend_error(err)
    except Exception:  # not the request's fault
        frontend_err = internal_error(err, "a stream")
    return sse(error_response_of(frontend_err))


def stream_closer(opened: Sequence[tuple[StepDelta, AsyncIterator[StepDelta]]],
                  tracker: RequestTracker) -> Callable[[], Awaitable[None]]:
    """The cleanup of a streaming response: cancel what is unfinished, close the tracker."""
    async def close() -> None:
        await close_streams(None, opened)
        tracker.finish()

    return close


def sse(payload: BaseModel | dict[str, Any]) -> bytes:
    # Every field is written, nulls included, as OpenAI's own chunks do.
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n".encode()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Runs work; if the client disconnects first, cancels it (closing the engine client's
    iterators, which aborts the requests) and returns None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator and then runs `cleanup`,
    however the response ends. Starlette cancels the body on disconnect for ASGI servers before
    spec 2.4, but on 2.4 it only sees a failed send and leaves the generator suspended; and a
    client gone before the body started leaves a generator whose `finally` never runs. Either
    way the engine requests must be aborted (freeing their KV blocks) now, not at GC."""

    def __init__(self, content: AsyncIterator[bytes],
                 cleanup: Callable[[], Awaitable[None]] | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            iterator: Any = self.body_iterator
            if hasattr(iterator, "aclose"):
                with contextlib.suppress(Exception):
                    await iterator.aclose()
            if self.cleanup is not None:
                await self.cleanup()
