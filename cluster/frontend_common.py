"""What the REST and gRPC front ends share: request errors that name a field, turning request
fields into `SamplingParams`, the context-length check, and iterator plumbing (close on exit,
merge several requests' streams)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

from zayaserve.cluster.engine_client import EngineClient
from zayaserve.replicas.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.engine.outputs import RequestOutput, RequestOutputBuilder, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.validation_errors import ParamError

logger = logging.getLogger("zayaserve.frontend")


class FrontendError(Exception):
    """A request the front end answers with an error. `status` is the HTTP code; gRPC maps it
    (see grpc_api). `param` names the offending request field, when one is to blame."""

    status = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return None


class InvalidRequestError(FrontendError):
    pass


class AuthenticationError(FrontendError):
    status = 401
    code = "invalid_api_key"


class ModelNotFoundError(FrontendError):
    status = 404
    code = "model_not_found"


class BodyTooLargeError(FrontendError):
    status = 413
    code = "request_too_large"


class OverloadedError(FrontendError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UnavailableError(FrontendError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"


class StalledStreamError(FrontendError):
    status = 408
    code = "stream_stalled"


class InternalServerError(FrontendError):
    status = 500
    error_type = "server_error"
    code = "internal_error"


def internal_error(err: BaseException, where: str) -> InternalServerError:
    """What a client is told of a failure that is not its fault: the class of what failed,
    never a traceback or a repr (those go to the log)."""
    logger.error("unexpected %s in %s", type(err).__name__, where, exc_info=err)
    return InternalServerError(f"internal error ({type(err).__name__}); see the server log")


def as_frontend_error(
    err: BaseException, renames: dict[str, str] | None = None, default_param: str | None = None
) -> FrontendError:
    """Maps what generation raises onto the error the client sees. `renames` translates engine
    field names into this API's (e.g. the engine's `prompt_token_ids` is REST's `prompt`).
    Anything that is not a request problem is re-raised, for the server's 500 path."""
    if isinstance(err, FrontendError):
        return err
    if isinstance(err, EngineOverloadedError):
        return OverloadedError(f"the server is overloaded, retry later ({err})",
                               retry_after_s=1)
    if isinstance(err, EngineDeadError):
        return UnavailableError(f"{err}; retry later", retry_after_s=1)
    if isinstance(err, RequestFailedError):
        if err.retryable:
            return UnavailableError(f"{err}: a peer it needs is unavailable; retry later",
                                    retry_after_s=1)
        return InternalServerError(str(err))
    if isinstance(err, StreamStalledError):
        return StalledStreamError(str(err))
    if isinstance(err, ValueError):  # a ParamError names its field; others get the default
        message = str(err)
        param = err.param if isinstance(err, ParamError) else default_param
        if param is not None and renames and param in renames:
            if message.startswith(param):  # say it in the client's terms
                message = renames[param] + message[len(param):]
            param = renames[param]
        if param is not None and not message.startswith(param):
            message = f"{param}: {message}"
        return InvalidRequestError(message, param)
    raise err


def build_sampling_params(fields: dict[str, Any], renames: dict[str, str] | None = None
                          ) -> SamplingParams:
    """SamplingParams from the request fields that were set (the rest keep vLLM's defaults)."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as err:
        raise as_frontend_error(err, renames) from None


def resolve_model(requested: str | None, served: Sequence[str]) -> str:
    """The model name to answer with; a name this server does not serve is a 404."""
    if not requested:
        return served[0]
    if requested not in served:
        raise ModelNotFoundError(
            f"The model `{requested}` does not exist; this server serves {list(served)}",
            "model")
    return requested


def check_context_length(
    client: EngineClient, num_prompt_tokens: int, max_tokens: int | None,
    prompt_field: str, max_tokens_field: str = "max_tokens",
) -> None:
    """Rejects, as vLLM does, a prompt that leaves no room to generate, or a prompt plus
    max_tokens beyond the model's context length."""
    limit = client.max_model_len
    if num_prompt_tokens >= limit:
        raise InvalidRequestError(
            f"{prompt_field}: this model's maximum context length is {limit} tokens, and the "
            f"prompt has {num_prompt_tokens} tokens, leaving no room to generate", prompt_field)
    if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
        raise InvalidRequestError(
            f"{max_tokens_field}: this model's maximum context length is {limit} tokens, but "
            f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} to generate); lower {max_tokens_field} or shorten the prompt",
            max_tokens_field)


def check_token_ids(client: EngineClient, ids: Sequence[int], field: str) -> None:
    if not ids:
        raise InvalidRequestError(f"{field}: must contain at least one token", field)
    vocab = client.tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})", field)


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
