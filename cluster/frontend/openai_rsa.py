"""POST /v1/chat/completions with `rsa` (or the flat rsa_* fields): a Markovian RSA run in one
engine, answered as an ordinary chat completion whose choices are the final round's calls,
whose `usage` sums every call, and which carries an `rsa` block with the run's rounds.
Streaming sends progress chunks (empty `choices`, `rsa_progress`) and then the final round's
text as ordinary deltas."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from zayaserve.cluster.frontend.api_keys import cache_salt
from zayaserve.cluster.frontend.chat_options import check_chat_options, message_dict
from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError, as_frontend_error
from zayaserve.cluster.frontend.openai_chat import ENDPOINT, stream_choices
from zayaserve.cluster.frontend.openai_chat_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
)
from zayaserve.cluster.frontend.reasoning import ReasoningMode, ThinkParser
from zayaserve.cluster.frontend.request_checks import served_model
from zayaserve.cluster.frontend.request_tracker import RequestTracker, w3c_headers
from zayaserve.cluster.frontend.rsa_protocol import (
    PromptTokensDetails,
    RSAChatCompletionChunk,
    RSAChatCompletionResponse,
    RSAInfo,
    RSAProgressOut,
    RSARound,
    RSAUsage,
)
from zayaserve.cluster.frontend.rsa_request import (
    collect_run,
    flat_renames,
    record_run,
    tenant_limited,
    unfinished,
)
from zayaserve.cluster.frontend.serving_context import ServingContext
from zayaserve.cluster.frontend.streams import (
    SSE_DONE,
    ClosingStreamingResponse,
    aclose_quietly,
    sse,
    stream_error_event,
    unless_disconnected,
)
from zayaserve.cluster.frontend.tool_calls import ToolPlan, ToolStream
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.rsa.events import RSAAnswerDelta, RSADone, RSAEvent, RSAJob, RSAProgress
from zayaserve.replicas.rsa.params import RSAParams
from zayaserve.replicas.rsa.rounds import round_params
from zayaserve.replicas.rsa.serving import preflight

# Request fields that make sense with a run; any other field set to a non-default value is
# refused by name (its meaning for a population of calls would be a guess).
_COMBINABLE = frozenset({
    "model", "messages", "stream", "stream_options", "seed", "cache_salt", "user",
    "chat_template_kwargs", "include_reasoning", "metadata", "rsa", "n",
    "add_generation_prompt"})
_INSTEAD = {"temperature": "rsa.final_sampling.temperature (rounds: rsa.round_temperature)",
            "top_p": "rsa.final_sampling.top_p", "top_k": "rsa.final_sampling.top_k",
            "max_tokens": "rsa.final_max_tokens (rounds: rsa.round_max_tokens)",
            "max_completion_tokens": "rsa.final_max_tokens (rounds: rsa.round_max_tokens)"}


def _check_combinable(body: ChatCompletionRequest) -> None:
    for name, info in type(body).model_fields.items():
        if name in _COMBINABLE or getattr(body, name) == info.get_default(
                call_default_factory=True):
            continue
        instead = f"; use {_INSTEAD[name]}" if name in _INSTEAD else ""
        raise InvalidRequestError(f"{name}: cannot be combined with rsa{instead}", name)
    if body.n not in (None, 1):
        raise InvalidRequestError("n: with rsa the answers are rsa.final_n", "n")
    if not body.add_generation_prompt:
        raise InvalidRequestError("add_generation_prompt: rsa needs the assistant turn opened",
                                  "add_generation_prompt")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options: only allowed with stream=true",
                                  "stream_options")


def _job(body: ChatCompletionRequest, params: RSAParams, ctx: ServingContext,
         tenant: str | None, chat_id: str) -> RSAJob:
    _check_combinable(body)
    check_chat_options(body)  # as an ordinary chat: template variable names, metadata
    last = body.messages[-1]
    if last.role != "user" or last.content is None:
        raise InvalidRequestError(
            f"messages[{len(body.messages) - 1}]: rsa needs the conversation to end with the "
            "problem, a user message", f"messages[{len(body.messages) - 1}]")
    problem = (last.content if isinstance(last.content, str)
               else "".join(part.text for part in last.content))
    if params.seed is None and body.seed is not None:  # every call derives its own from it
        params = params.model_copy(update={"seed": body.seed})
    conversation = [message_dict(m, i) for i, m in enumerate(body.messages)]
    kwargs: dict[str, Any] = dict(body.chat_template_kwargs or {})
    try:
        text, ids = ctx.client.tokenizer.render_chat(conversation, **kwargs)
    except ValueError as err:
        raise as_frontend_error(err, default_param="messages") from None
    return RSAJob(chat_id, problem, text, ids, params, history=conversation[:-1],
                  template_kwargs=kwargs, cache_salt=cache_salt(tenant, body.cache_salt))


def _info(job: RSAJob, done: RSADone, bound: int) -> RSAInfo:
    p = job.params
    return RSAInfo(
        n=p.n, k=p.effective_k, t=p.t, tail_tokens=p.tail_tokens, seed=p.seed,
        calls=done.calls, max_context=done.max_context, max_context_bound=bound,
        rounds=[RSARound(round=r.index, calls=r.calls, prompt_tokens=r.prompt_tokens,
                         cached_tokens=r.cached_tokens, completion_tokens=r.completion_tokens,
                         max_context=r.max_context) for r in done.rounds],
        population=None if done.population is None else [list(t) for t in done.population])


def _usage(done: RSADone) -> RSAUsage:
    prompt, completion = done.prompt_tokens, done.completion_tokens
    return RSAUsage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion,
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=done.cached_tokens))


def _progress(event: RSAProgress) -> RSAProgressOut:
    return RSAProgressOut(round=event.round, rounds=event.rounds, calls_done=event.calls_done,
                          calls_total=event.calls_total)


async def create_rsa_chat_completion(body: ChatCompletionRequest, params: RSAParams,
                                     ctx: ServingContext, request: Request,
                                     tenant: str | None) -> Response:
    model = served_model(body.model, ctx.served_model_names)
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"
    job = _job(body, params, ctx, tenant, chat_id)
    try:
        bound = preflight(ctx.client.tokenizer, job, ctx.rsa_limits,
                          ctx.client.max_model_len)
    except ValueError as err:
        raise as_frontend_error(err, flat_renames(body)) from None
    final = round_params(job.params, job.params.t, 0, True)
    mode = ReasoningMode.of(ctx.reasoning_parser, body.include_reasoning, job.prompt_text or "")
    tracker = ctx.metrics.track(ENDPOINT, "chat", model, w3c_headers(request.headers))
    tracker.describe(final, chat_id)
    try:
        runs = ctx.rsa_limits.max_runs_per_tenant
        if body.stream:
            events = tenant_limited(ctx.client, tenant, runs, ctx.client.rsa(job))
            first = await anext(events)  # admission errors before the 200
            options = body.stream_options
            return ClosingStreamingResponse(
                _events(first, events, job, bound, final, ctx, model, tracker, mode,
                        bool(options and options.include_usage)),
                cleanup=lambda: _close(events, tracker), media_type="text/event-stream")
        result = await unless_disconnected(request, collect_run(
            tenant_limited(ctx.client, tenant, runs, ctx.client.rsa(job)), job, tracker))
    except Exception as err:
        tracker.finish(served=False, error=err)
        raise as_frontend_error(err) from None
    if result is None:
        tracker.finish(served=False)
        return Response(status_code=499)  # the client left; nobody reads this
    answers, done = result
    tracker.finish()
    choices = []
    for i, c in enumerate(answers):
        reasoning, content = mode.split(c.text)
        choices.append(ChatChoice(
            index=i, message=ChatMessage(content=content, reasoning_content=reasoning),
            finish_reason=c.finish_reason,  # type: ignore[arg-type]
            stop_reason=c.stop_reason))
    return JSONResponse(RSAChatCompletionResponse(
        id=chat_id, model=model, choices=choices, usage=_usage(done),
        rsa=_info(job, done, bound)).model_dump())


async def _close(events: AsyncIterator[RSAEvent], tracker: RequestTracker) -> None:
    await aclose_quietly(events)
    tracker.finish(served=False)  # a no-op when the stream finished it


async def _events(first: RSAEvent, events: AsyncIterator[RSAEvent], job: RSAJob, bound: int,
                  final: SamplingParams, ctx: ServingContext, model: str,
                  tracker: RequestTracker, mode: ReasoningMode,
                  include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    parsers: dict[int, ThinkParser] = {}
    tools: dict[int, ToolStream] = {}
    opened: set[int] = set()
    plan = ToolPlan()

    def chunk(choices: list[ChatStreamChoice], **extra: object) -> bytes:
        return sse(RSAChatCompletionChunk(id=job.request_id, created=created, model=model,
                                          choices=choices, **extra))  # type: ignore[arg-type]

    async def stream() -> AsyncIterator[RSAEvent]:
        yield first
        async for event in events:
            yield event

    try:
        async for event in stream():
            if isinstance(event, RSAProgress):
                yield chunk([], rsa_progress=_progress(event))
            elif isinstance(event, RSAAnswerDelta):
                tracker.on_delta(event.index, event.delta)
                if event.index not in opened:  # OpenAI opens a choice with a role-only delta
                    opened.add(event.index)
                    yield chunk([ChatStreamChoice(index=event.index, delta=DeltaMessage(
                        role="assistant", content=""))])
                delta = dataclasses.replace(event.delta, completions=tuple(
                    dataclasses.replace(c, index=event.index) for c in event.delta.completions))
                choices = stream_choices(delta, final, ctx, mode, parsers, tools, plan)
                if choices:
                    yield chunk(choices)
            else:
                record_run(tracker, job, event)
                yield chunk([], rsa=_info(job, event, bound),
                            usage=_usage(event) if include_usage else None)
                tracker.finish()
                yield SSE_DONE
                return
        raise unfinished()
    except Exception as err:  # a 200 is already out: report in-band, then end the stream
        tracker.finish(served=False, error=err)
        yield stream_error_event(err)
        yield SSE_DONE
