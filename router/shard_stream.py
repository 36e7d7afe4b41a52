"""The router's side of one shard's dispatch stream: a persistent bidirectional gRPC stream that
carries every layer's rows for that shard as raw messages (`stream_wire`) instead of a unary
call per layer (no per-call stream set-up, metadata or protobuf).

Messages go out under a lock and come back in order; each waits for its answer by call id, at
most `timeout` seconds. A stream that fails (the shard went away, the channel closed, or an
answer came too late, so the shard may be stuck) fails every message still waiting with its
status, and the next message opens a new stream; the router retries those rows as it retries
failed calls.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import grpc

from zayaserve.router.shard_stream_server import STREAM_METHOD
from zayaserve.router.stream_wire import call_id_of


class StreamCallError(Exception):
    """A message the stream could not answer: the status the router treats it by."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class ShardStream:
    def __init__(self, channel: grpc.aio.Channel, metadata: Any) -> None:
        self._method = channel.stream_stream(STREAM_METHOD)  # raw bytes both ways
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def request(self, build: Callable[[int], bytes], timeout: float) -> bytes:
        """Sends `build(call_id)` and returns its answer; raises `StreamCallError`."""
        call_id = next(self._ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the whole message: the write (a peer that stopped
        answer: asyncio.Future[bytes] = loop.create_future()  # reading blocks it) and answer
        self._waiting[call_id] = answer
        try:
            call = None
            try:
                async with asyncio.timeout(timeout):
                    async with self._lock:
                        call = self._open()
                        await call.write(build(call_id))
            except TimeoutError:
                self._give_up(answer, call or self._call, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the message was not taken within {timeout:.3g} s")
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else \
                    grpc.StatusCode.UNAVAILABLE
                self._give_up(answer, call, code, f"write: {e}")
            try:
                left = max(deadline - loop.time(), 0.0)
                return await asyncio.wait_for(asyncio.shield(answer), left)
            except TimeoutError:
                # The shard may be stuck: end the stream (others waiting on it are retried).
                self._fail(self._call, grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"no answer within {timeout:.3g} s")
                return await answer  # raises what _fail set
        finally:
            self._waiting.pop(call_id, None)

    def _give_up(self, answer: asyncio.Future[bytes], call: Any, code: grpc.StatusCode,
                 details: str) -> None:
        """A message that could not be sent: its stream ends, and so does the message (also
        when the stream had already been replaced)."""
        self._fail(call, code, details)
        if not answer.done():
            answer.set_exception(StreamCallError(code, details))

    def _open(self) -> Any:
        if self._call is None:
            self._call = self._method(metadata=self._metadata)
            self._reader = asyncio.ensure_future(self._read(self._call))
        return self._call

    async def _read(self, call: Any) -> None:
        try:
            while True:
                data = await call.read()
                if data is grpc.aio.EOF:
                    self._fail(call, grpc.StatusCode.UNAVAILABLE, "the shard ended the stream")
                    return
                answer = self._waiting.get(call_id_of(data))
                if answer is not None and not answer.done():
                    answer.set_result(data)
        except grpc.aio.AioRpcError as e:
            self._fail(call, e.code(), e.details() or "")
        except asyncio.CancelledError:
            self._fail(call, grpc.StatusCode.CANCELLED, "stream closed")
            raise
        except Exception as e:  # noqa: BLE001 - whatever broke the stream fails its messages
            self._fail(call, grpc.StatusCode.UNAVAILABLE, f"{type(e).__name__}: {e}")

    def _fail(self, call: Any, code: grpc.StatusCode, details: str) -> None:
        """Ends `call` (if still the current stream) and fails every message waiting on it."""
        if call is None or call is not self._call:
            return
        self._call = None
        reader, self._reader = self._reader, None
        call.cancel()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(StreamCallError(code, details))

    def close(self) -> None:
        self._fail(self._call, grpc.StatusCode.CANCELLED, "stream closed")
