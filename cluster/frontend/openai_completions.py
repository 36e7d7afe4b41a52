"""POST /v1/completions: prompts (text or token ids, one or many) to text completions, whole or
as server-sent events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from zayaserve.cluster.frontend.api_keys import cache_salt
from zayaserve.cluster.frontend.completion_echo import (
    Echo,
    join,
    prompt_logprobs_layout,
    prompt_text,
)
from zayaserve.cluster.frontend.frontend_errors import (
    InvalidRequestError,
    as_frontend_error,
    internal_error,
)
from zayaserve.cluster.frontend.json_chunks import chunked_json
from zayaserve.cluster.frontend.logprob_format import completion_logprobs, prompt_logprobs_out
from zayaserve.cluster.frontend.openai_completions_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from zayaserve.cluster.frontend.openai_protocol import UsageInfo
from zayaserve.cluster.frontend.request_checks import (
    build_sampling_params,
    check_context_length,
    check_prompt_logprobs,
    check_token_ids,
    served_model,
)
from zayaserve.cluster.frontend.request_tracker import RequestTracker, w3c_headers
from zayaserve.cluster.frontend.response_budget import check_response_budget, logprob_entries
from zayaserve.cluster.frontend.serving_context import ServingContext
from zayaserve.cluster.frontend.streams import (
    SSE_DONE,
    ClosingStreamingResponse,
    close_streams,
    collect,
    merge_streams,
    open_streams,
    sse,
    stream_closer,
    stream_error_event,
    unless_disconnected,
)
from zayaserve.cluster.frontend.structured_request import constraint_renames, structured_spec
from zayaserve.cluster.frontend.usage import UsageCounter, usage_of
from zayaserve.replicas.engine.outputs import RequestOutput, StepDelta
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.model.tokenizer import Tokenizer

ENDPOINT = "/v1/completions"
# The engine names token-id prompts `prompt_token_ids`; here they arrive as `prompt`.
_RENAMES = {"prompt_token_ids": "prompt"}

Prompt = tuple[str | None, list[int]]


def _prompts(body: CompletionRequest, ctx: ServingContext) -> list[Prompt]:
    tokenizer = ctx.client.tokenizer
    raw = body.prompt
    if not raw:
        raise InvalidRequestError("prompt: must not be empty", "prompt")
    single = isinstance(raw, str) or isinstance(raw[0], int)  # text, or one id list
    items: list[str | list[int]] = [raw] if single else list(raw)  # type: ignore[list-item,arg-type]
    if len(items) > ctx.max_prompts:
        raise InvalidRequestError(
            f"prompt: at most {ctx.max_prompts} prompts per request "
            f"(limits.max_prompts_per_request), got {len(items)}", "prompt")
    prompts: list[Prompt] = []
    for i, item in enumerate(items):
        field = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            prompts.append((item, tokenizer.encode(item)))
        else:
            check_token_ids(ctx.client, item, field)
            prompts.append((None, list(item)))
    return prompts


def _params(body: CompletionRequest, salt: str | None, echo: Echo) -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options: only allowed with stream=true",
                                  "stream_options")
    check_prompt_logprobs(body)
    if body.echo and body.logprobs is not None and body.prompt_logprobs not in (
            None, body.logprobs):
        raise InvalidRequestError("prompt_logprobs: with echo it must equal logprobs",
                                  "prompt_logprobs")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequestError("best_of: only best_of == n is supported", "best_of")
    fields = dict(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos, max_tokens=body.max_tokens, min_tokens=body.min_tokens,
        logprobs=body.logprobs, skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output, cache_salt=salt,
        prompt_logprobs=body.prompt_logprobs, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, structured_outputs=structured_spec(body))
    return build_sampling_params({**fields, **echo.engine_fields(body)})


async def create_completion(body: CompletionRequest, ctx: ServingContext,
                            request: Request, tenant: str | None = None) -> Response:
    model = served_model(body.model, ctx.served_model_names)
    echo = Echo.of(body)
    params = _params(body, cache_salt(tenant, body.cache_salt), echo)
    # Tokenizing up to a megabyte of prompts is work for a thread, not the event loop.
    prompts = await asyncio.to_thread(_prompts, body, ctx)
    for i, (_, ids) in enumerate(prompts):
        check_context_length(ctx.client, len(ids), params.max_tokens,
                             "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    check_response_budget(logprob_entries(
        [len(ids) for _, ids in prompts], params.n, params.max_tokens, ctx.client.max_model_len,
        None if echo.scoring_only else params.logprobs, body.prompt_logprobs,
        params.logprobs if echo.enabled else None), ctx.max_response_logprobs,
        "logprobs" if body.logprobs is not None else "prompt_logprobs")
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    requests = [(f"{completion_id}-{i}", ids, text) for i, (text, ids) in enumerate(prompts)]
    tracker = ctx.metrics.track(ENDPOINT, "text_completion", model,
                                w3c_headers(request.headers))
    tracker.describe(params, completion_id)
    try:
        if body.stream:
            opened = await open_streams(ctx.client, requests, params)
            tracker.on_prompt(sum(len(ids) for _, ids in prompts))
            options = body.stream_options
            events = _events(opened, params, ctx, completion_id, model, tracker,
                             bool(options and options.include_usage), echo, prompts,
                             bool(options and options.usage_in_every_chunk()))
            return ClosingStreamingResponse(
                events, cleanup=stream_closer(opened, tracker), media_type="text/event-stream")
        final = await unless_disconnected(
            request, collect(ctx.client, requests, params, on_delta=tracker.on_delta))
    except Exception as err:
        tracker.finish(served=False, error=err)
        raise as_frontend_error(err, {**_RENAMES, **constraint_renames(body)}) from None
    if final is None:
        tracker.finish(served=False)
        return Response(status_code=499)  # the client left; nobody reads this
    tracker.on_prompt(sum(len(ids) for _, ids in prompts))
    tracker.finish()

    def respond() -> Response:
        return chunked_json(_response(final, params, ctx, completion_id, model, echo, prompts,
                                      body.prompt_logprobs is not None))
    # A response with logprobs can take the formatting of a million entries: off the loop,
    # so that /health and every other stream go on meanwhile.
    if params.logprobs is None and body.prompt_logprobs is None:
        return respond()
    return await asyncio.to_thread(respond)


def _response(final: list[RequestOutput], params: SamplingParams, ctx: ServingContext,
              completion_id: str, model: str, echo: Echo, prompts: list[Prompt],
              want_prompt_logprobs: bool = False) -> CompletionResponse:
    tokenizer = ctx.client.tokenizer
    choices = []
    for i, out in enumerate(final):
        head_text, head_lp, offset = "", None, 0
        if echo.enabled:
            head_text = prompt_text(tokenizer, prompts[i][0], out.prompt_token_ids)
            if params.logprobs is not None:
                head_lp, offset = prompt_logprobs_layout(tokenizer, out.prompt_token_ids,
                                                         out.prompt_logprobs)
        prompt_lp = (prompt_logprobs_out(tokenizer, out.prompt_logprobs)
                     if want_prompt_logprobs else None)
        for c in out.outputs:
            logprobs = head_lp
            if params.logprobs is not None and c.logprobs is not None and not echo.scoring_only:
                tail, _ = completion_logprobs(tokenizer, c.token_ids, c.logprobs, offset)
                logprobs = join(head_lp, tail)
            text = head_text + ("" if echo.scoring_only else c.text)
            choices.append(CompletionChoice(
                index=i * params.n + c.index, text=text, logprobs=logprobs,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
                stop_reason=None if echo.scoring_only else c.stop_reason,
                prompt_logprobs=prompt_lp))
    usage = usage_of(final)
    if echo.scoring_only:
        usage = UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=0,
                          total_tokens=usage.prompt_tokens)
    return CompletionResponse(id=completion_id, model=model, choices=choices, usage=usage)


def _stream_choices(i: int, delta: StepDelta, text_offsets: dict[tuple[int, int], int],
                    params: SamplingParams, tokenizer: Tokenizer, echo: Echo,
                    prompt: Prompt) -> list[CompletionChoice]:
    """What prompt i's delta adds for the client, one entry per choice with news (the echoed
    prompt first, on the request's first delta)."""
    choices = []
    head: dict[int, tuple[str, CompletionLogprobs | None]] = {}
    if echo.enabled and delta.prompt_token_ids is not None:
        ids = list(delta.prompt_token_ids)
        lp = None
        if params.logprobs is not None:
            lp, end = prompt_logprobs_layout(tokenizer, ids, delta.prompt_logprobs)
            for k in range(params.n):
                text_offsets[(i, k)] = end
        head = dict.fromkeys(range(params.n), (prompt_text(tokenizer, prompt[0], ids), lp))
    for c in delta.completions:
        text, token_ids, lps = c.text, list(c.token_ids), c.logprobs
        if echo.scoring_only:
            text, token_ids, lps = "", [], None
        echoed, logprobs = head.pop(c.index, ("", None))
        if params.logprobs is not None and lps is not None and token_ids:
            key = (i, c.index)
            tail, text_offsets[key] = completion_logprobs(
                tokenizer, token_ids, list(lps), text_offsets.get(key, 0))
            logprobs = join(logprobs, tail)
        if not (echoed or text or token_ids or c.finish_reason):
            continue
        choices.append(CompletionChoice(
            index=i * params.n + c.index, text=echoed + text, logprobs=logprobs,
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
            stop_reason=None if echo.scoring_only else c.stop_reason))
    for k, (echoed, logprobs) in head.items():  # completions with no news in this delta
        choices.append(CompletionChoice(index=i * params.n + k, text=echoed,
                                        logprobs=logprobs))
    return choices


async def _events(
    opened: list[tuple[StepDelta, AsyncIterator[StepDelta]]], params: SamplingParams,
    ctx: ServingContext, completion_id: str, model: str, tracker: RequestTracker,
    include_usage: bool, echo: Echo, prompts: list[Prompt], continuous_usage: bool = False,
) -> AsyncIterator[bytes]:
    tokenizer = ctx.client.tokenizer
    created = int(time.time())
    text_offsets: dict[tuple[int, int], int] = {}
    usage = UsageCounter()
    heavy = params.logprobs is not None
    outputs = merge_streams(opened)
    try:
        async for i, delta in outputs:
            tracker.on_delta(i, delta)
            usage.add(delta, count_completion=not echo.scoring_only)
            def chunk(i: int = i, delta: StepDelta = delta) -> bytes | None:
                choices = _stream_choices(i, delta, text_offsets, params, tokenizer, echo,
                                          prompts[i])
                return sse(CompletionStreamResponse(
                    id=completion_id, created=created, model=model, choices=choices,
                    usage=usage.usage() if continuous_usage else None)) if choices else None
            try:  # with logprobs (an echoed prompt's above all), formatting is off the loop
                event = await asyncio.to_thread(chunk) if heavy else chunk()
            except Exception as err:  # a bug here is the server's, whatever its type
                raise internal_error(err, ENDPOINT) from err
            if event is not None:
                yield event
        if include_usage:
            yield sse(CompletionStreamResponse(id=completion_id, created=created, model=model,
                                               choices=[], usage=usage.usage()))
        yield SSE_DONE
    except Exception as err:  # a 200 is already out: report in-band, then end the stream
        yield stream_error_event(err)
        yield SSE_DONE
    finally:
        await close_streams(outputs, opened)
        tracker.finish()
