"""Pieces the completions and chat endpoints share: logprobs in both OpenAI layouts, usage,
SSE framing and in-band stream errors, and cancelling work when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from zayaserve.cluster.engine_client import EngineClient
from zayaserve.cluster.frontend_common import (
    FrontendError,
    as_frontend_error,
    close_streams,
    internal_error,
)
from zayaserve.cluster.metrics import MetricsCollector, RequestTracker
from zayaserve.cluster.openai_chat_protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from zayaserve.cluster.openai_protocol import (
    CompletionLogprobs,
    ErrorDetail,
    ErrorResponse,
    UsageInfo,
)
from zayaserve.replicas.engine.outputs import Logprob, RequestOutput, StepDelta
from zayaserve.replicas.model.tokenizer import Tokenizer

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class ServingContext:
    """What every endpoint handler needs."""

    client: EngineClient
    served_model_names: list[str]
    metrics: MetricsCollector
    max_prompts: int = 64  # prompts in one completions request


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


class UsageCounter:
    """Usage of a streamed response, counted from its deltas (O(1) per delta)."""

    def __init__(self) -> None:
        self.prompt = self.completion = 0

    def add(self, delta: StepDelta) -> None:
        if delta.prompt_token_ids is not None:
            self.prompt += len(delta.prompt_token_ids)
        self.completion += sum(len(c.token_ids) for c in delta.completions)

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.prompt, completion_tokens=self.completion,
                         total_tokens=self.prompt + self.completion)


def usage_of(outputs: Sequence[RequestOutput]) -> UsageInfo:
    """Each prompt counts once however many completions it has, as OpenAI counts it."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


# ---- token text and bytes -----------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes stand for themselves, the rest
    were shifted to code points from 256 up, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The token's own bytes; a byte-level token may hold part of a UTF-8 character, which its
    decoded text (U+FFFD) would lose."""
    decoder = getattr(tokenizer.hf, "decoder", None)
    piece = tokenizer.id_to_token(token_id)
    if piece is not None and type(decoder).__name__ == "ByteLevel":
        alphabet = _byte_level_alphabet()
        if all(ch in alphabet for ch in piece):
            return [alphabet[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def _ranked(entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda kv: (-kv[1].logprob, kv[0]))


def completion_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]],
    start_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy layout for these tokens, text offsets counted from start_offset; returns it
    and the offset after the last token. top_logprobs holds the sampled token and the top-k,
    as vLLM's does."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(entries[token_id].logprob if token_id in entries else None)
        out.top_logprobs.append({token_text(tokenizer, t): lp.logprob
                                 for t, lp in _ranked(entries)})
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]],
    top_k: int,
) -> ChatLogprobs:
    """The chat layout: each token with its bytes and exactly top_k alternatives by rank."""
    content = []
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        top = [ChatTopLogprob(token=token_text(tokenizer, t), logprob=lp.logprob,
                              bytes=token_bytes(tokenizer, t))
               for t, lp in _ranked(entries)[:top_k]]
        sampled = entries.get(token_id)
        content.append(ChatTokenLogprob(
            token=token_text(tokenizer, token_id),
            logprob=sampled.logprob if sampled is not None else float("-inf"),
            bytes=token_bytes(tokenizer, token_id), top_logprobs=top))
    return ChatLogprobs(content=content)


# ---- disconnects --------------------------------------------------------------------------


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
