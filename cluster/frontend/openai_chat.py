"""POST /v1/chat/completions: a conversation, rendered with the checkpoint's chat template
exactly as `LLM.chat` renders it, to assistant replies, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from zayaserve.cluster.frontend.api_keys import cache_salt
from zayaserve.cluster.frontend.chat_options import (
    check_chat_options,
    message_dict,
    open_final_message,
)
from zayaserve.cluster.frontend.frontend_errors import (
    InvalidRequestError,
    as_frontend_error,
    internal_error,
)
from zayaserve.cluster.frontend.json_chunks import chunked_json
from zayaserve.cluster.frontend.logprob_format import chat_logprobs, prompt_logprobs_out
from zayaserve.cluster.frontend.openai_chat_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
)
from zayaserve.cluster.frontend.reasoning import ReasoningMode, ThinkParser
from zayaserve.cluster.frontend.request_checks import (
    build_sampling_params,
    check_context_length,
    check_prompt_logprobs,
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
from zayaserve.cluster.frontend.tool_calls import ToolPlan, ToolStream
from zayaserve.cluster.frontend.tool_protocol import ToolCall
from zayaserve.cluster.frontend.usage import UsageCounter, usage_of
from zayaserve.replicas.engine.outputs import RequestOutput, StepDelta
from zayaserve.replicas.engine.params import SamplingParams

ENDPOINT = "/v1/chat/completions"


def _max_tokens_field(body: ChatCompletionRequest) -> str:
    return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"


def _params(body: ChatCompletionRequest, room: int, salt: str | None, plan: ToolPlan,
            skip_special: bool | None) -> SamplingParams:
    """room: tokens left in the context after the prompt, the default max_tokens (vLLM's)."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options: only allowed with stream=true",
                                  "stream_options")
    check_prompt_logprobs(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs: requires logprobs=true", "top_logprobs")
    max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                  else body.max_tokens)
    spec = structured_spec(body)
    if spec is not None and plan.constrains:
        raise InvalidRequestError("tool_choice: required or a named function cannot be combined "
                                  "with another output constraint", "tool_choice")
    return build_sampling_params(dict(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=body.stop, stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
        max_tokens=max_tokens if max_tokens is not None else room,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        skip_special_tokens=skip_special, structured_outputs=spec or plan.constraint(),
        include_stop_str_in_output=body.include_stop_str_in_output, cache_salt=salt,
        prompt_logprobs=body.prompt_logprobs, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty),
        renames={"logprobs": "top_logprobs", "max_tokens": _max_tokens_field(body)})


def _prompt(body: ChatCompletionRequest, ctx: ServingContext,
            plan: ToolPlan) -> tuple[str, list[int]]:
    check_chat_options(body)
    conversation = [message_dict(m, i) for i, m in enumerate(body.messages)]
    try:  # as LLM.chat: special-token strings in the messages (and tools) stay plain text
        text, ids = ctx.client.tokenizer.render_chat(
            conversation, add_generation_prompt=body.add_generation_prompt,
            tools=plan.template_tools, **(body.chat_template_kwargs or {}))
    except ValueError as err:
        raise as_frontend_error(err, default_param="messages") from None
    if body.continue_final_message:
        text, ids = open_final_message(ctx.client.tokenizer, text, ids, conversation[-1])
    return text, ids


async def create_chat_completion(body: ChatCompletionRequest, ctx: ServingContext,
                                 request: Request, tenant: str | None = None) -> Response:
    model = served_model(body.model, ctx.served_model_names)
    plan = ToolPlan.of(body, ctx.tool_call_parser)
    text, ids = _prompt(body, ctx, plan)
    check_context_length(ctx.client, len(ids), None, "messages")
    params = _params(body, ctx.client.max_model_len - len(ids),
                     cache_salt(tenant, body.cache_salt), plan, _skip_special(body, plan, ctx))
    check_context_length(ctx.client, len(ids), params.max_tokens, "messages",
                         _max_tokens_field(body))
    check_response_budget(logprob_entries(
        [len(ids)], params.n, params.max_tokens, ctx.client.max_model_len, params.logprobs,
        params.prompt_logprobs), ctx.max_response_logprobs,
        "top_logprobs" if params.logprobs is not None else "prompt_logprobs")
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"
    # A constrained reply (schema, required or named tool) is all answer: no thinking in it.
    constrained = params.structured_outputs is not None
    mode = ReasoningMode.of(None if constrained else ctx.reasoning_parser,
                            body.include_reasoning, text)
    requests = [(chat_id, ids, text)]
    tracker = ctx.metrics.track(ENDPOINT, "chat", model, w3c_headers(request.headers))
    tracker.describe(params, chat_id)
    renames = {"prompt": "messages", "prompt_token_ids": "messages",
               **constraint_renames(body, plan.constrains)}
    try:
        if body.stream:
            opened = await open_streams(ctx.client, requests, params)
            tracker.on_prompt(len(ids))
            options = body.stream_options
            events = _events(opened, params, ctx, chat_id, model, tracker,
                             bool(options and options.include_usage),
                             bool(options and options.usage_in_every_chunk()), mode, plan)
            return ClosingStreamingResponse(
                events, cleanup=stream_closer(opened, tracker), media_type="text/event-stream")
        final = await unless_disconnected(
            request, collect(ctx.client, requests, params, on_delta=tracker.on_delta))
    except Exception as err:
        tracker.finish(served=False, error=err)
        raise as_frontend_error(err, renames) from None
    if final is None:
        tracker.finish(served=False)
        return Response(status_code=499)  # the client left; nobody reads this
    tracker.on_prompt(len(ids))
    tracker.finish()

    def respond() -> Response:
        return chunked_json(_response(final[0], params, ctx, chat_id, model, mode, plan))
    # Logprobs of n long replies are much formatting: off the loop (response_budget.py).
    if params.logprobs is None and params.prompt_logprobs is None:
        return respond()
    return await asyncio.to_thread(respond)


def _skip_special(body: ChatCompletionRequest, plan: ToolPlan,
                  ctx: ServingContext) -> bool | None:
    """vLLM's rule: when the tool-call tags are special tokens, parsing needs them in the text."""
    if plan.mode == "auto" and ctx.client.tokenizer.token_to_id("<tool_call>") is not None:
        return False
    return body.skip_special_tokens


def _finish(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else reason


def _logprobs(params: SamplingParams, ctx: ServingContext, token_ids: list[int],
              logprobs: list | None) -> ChatLogprobs | None:
    if params.logprobs is None or logprobs is None:
        return None
    return chat_logprobs(ctx.client.tokenizer, token_ids, logprobs, params.logprobs)


def _response(out: RequestOutput, params: SamplingParams, ctx: ServingContext, chat_id: str,
              model: str, mode: ReasoningMode, plan: ToolPlan) -> ChatCompletionResponse:
    choices = []
    for c in out.outputs:
        reasoning, content = mode.split(c.text)
        calls: list[ToolCall] = []
        if content is not None:
            content, calls = plan.message(content, c.finish_reason == "stop")
        choices.append(ChatChoice(
            index=c.index, message=ChatMessage(content=content, reasoning_content=reasoning,
                                               tool_calls=calls),
            logprobs=_logprobs(params, ctx, c.token_ids, c.logprobs),
            finish_reason=_finish(c.finish_reason, bool(calls)),  # type: ignore[arg-type]
            stop_reason=c.stop_reason))
    return ChatCompletionResponse(
        id=chat_id, model=model, choices=choices, usage=usage_of([out]),
        prompt_logprobs=prompt_logprobs_out(ctx.client.tokenizer, out.prompt_logprobs)
        if params.prompt_logprobs is not None else None)


def stream_choices(delta: StepDelta, params: SamplingParams, ctx: ServingContext,
                    mode: ReasoningMode, parsers: dict[int, ThinkParser],
                    tools: dict[int, ToolStream], plan: ToolPlan) -> list[ChatStreamChoice]:
    """One entry per choice with news in this delta."""
    choices = []
    for c in delta.completions:
        if not (c.text or c.token_ids or c.finish_reason):
            continue
        final = c.finish_reason is not None
        reasoning, content = None, c.text
        if mode.enabled:
            parser = parsers.setdefault(c.index, mode.stream())
            thought, said = parser.feed(c.text, final=final)
            reasoning = (thought or None) if mode.include else None
            content = said
        tool = tools.setdefault(c.index, plan.stream())
        said_text, calls = tool.feed(content or "", final)
        choices.append(ChatStreamChoice(
            index=c.index, delta=DeltaMessage(content=said_text if said_text or not calls
                                              else None, reasoning_content=reasoning,
                                              tool_calls=calls),
            logprobs=_logprobs(params, ctx, list(c.token_ids),
                               list(c.logprobs) if c.logprobs is not None else None),
            finish_reason=_finish(c.finish_reason, tool.called),  # type: ignore[arg-type]
            stop_reason=c.stop_reason))
    return choices


async def _events(
    opened: list[tuple[StepDelta, AsyncIterator[StepDelta]]], params: SamplingParams,
    ctx: ServingContext, chat_id: str, model: str, tracker: RequestTracker, include_usage: bool,
    continuous_usage: bool = False, mode: ReasoningMode | None = None,
    plan: ToolPlan | None = None,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    mode = mode or ReasoningMode()
    plan = plan or ToolPlan()
    parsers: dict[int, ThinkParser] = {}
    tools: dict[int, ToolStream] = {}

    def chunk(choices: list[ChatStreamChoice]) -> bytes:
        return sse(ChatCompletionStreamResponse(
            id=chat_id, created=created, model=model, choices=choices,
            usage=usage.usage() if continuous_usage else None))

    usage = UsageCounter()
    heavy = params.logprobs is not None
    outputs = merge_streams(opened)
    try:
        # OpenAI opens every choice with a role-only delta.
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(params.n)])
        async for _, delta in outputs:
            tracker.on_delta(0, delta)
            usage.add(delta)
            def step(delta: StepDelta = delta) -> bytes | None:
                choices = stream_choices(delta, params, ctx, mode, parsers, tools, plan)
                return chunk(choices) if choices else None
            try:  # n choices' top logprobs: formatted off the loop
                event = await asyncio.to_thread(step) if heavy else step()
            except Exception as err:  # a bug here is the server's, whatever its type
                raise internal_error(err, ENDPOINT) from err
            if event is not None:
                yield event
        if include_usage:
            yield sse(ChatCompletionStreamResponse(id=chat_id, created=created, model=model,
                                                   choices=[], usage=usage.usage()))
        yield SSE_DONE
    except Exception as err:  # a 200 is already out: report in-band, then end the stream
        yield stream_error_event(err)
        yield SSE_DONE
    finally:
        await close_streams(outputs, opened)
        tracker.finish()
