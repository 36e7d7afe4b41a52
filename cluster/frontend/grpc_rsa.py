"""Generate / GenerateUnary with `rsa` set: a Markovian RSA run in one engine, over gRPC.

The streamed call sends a message with `rsa_progress` whenever a round starts or a call
finishes, then the final round's text as ordinary `outputs` (`index` = the answer), and last a
message with `finished`, `usage` (every call's tokens, `cached_tokens` among them) and `rsa`
(the run's rounds). The unary call answers the whole result at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from zayaserve.cluster.frontend.api_keys import cache_salt
from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.grpc_messages import delta_pb
from zayaserve.cluster.frontend.request_tracker import RequestTracker
from zayaserve.cluster.frontend.rsa_request import collect_run, record_run, unfinished
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.replicas.rsa.events import RSAAnswerDelta, RSADone, RSAEvent, RSAJob, RSAProgress
from zayaserve.replicas.rsa.params import RSAParams
from zayaserve.replicas.rsa.serving import RSALimits, preflight
from zayaserve.replicas.validation_errors import ParamError

_FIELDS = ("n", "k", "t", "tail_tokens", "carry", "round_max_tokens", "final_max_tokens",
           "final_n", "round_temperature", "seed", "aggregation_template", "return_population")


def rsa_params(message: pb.RSAParams) -> RSAParams:
    """The request's `rsa` message as RSAParams (unset fields: the defaults); a bad value is a
    ParamError naming `rsa.<field>`."""
    fields: dict[str, Any] = {f: getattr(message, f) for f in _FIELDS if message.HasField(f)}
    if message.HasField("final_sampling"):
        s = message.final_sampling
        fields["final_sampling"] = {f: getattr(s, f) for f in ("temperature", "top_p", "top_k")
                                    if s.HasField(f)}
    try:
        return RSAParams.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        param = f"rsa.{where}" if where else "rsa"
        raise ParamError(param, f"{param}: {first['msg']}") from None


def rsa_job(request: pb.GenerateRequest, client: EngineClient, tenant: str | None,
            limits: RSALimits) -> tuple[RSAJob, int]:
    """(the job, the per-call bound) for a request with `rsa`; refuses what cannot run."""
    if request.HasField("sampling"):
        raise InvalidRequestError("sampling: cannot be combined with rsa (set rsa.final_sampling"
                                  ", rsa.round_temperature and the rsa token budgets)", "sampling")
    params = rsa_params(request.rsa)
    which = request.WhichOneof("input")
    request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
    salt = cache_salt(tenant, request.cache_salt if request.HasField("cache_salt") else None)
    tokenizer = client.tokenizer
    if which == "prompt":
        job = RSAJob(request_id, request.prompt, request.prompt, tokenizer.encode(request.prompt),
                     params, cache_salt=salt, chat=False)
    elif which == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        if not messages or messages[-1]["role"] != "user":
            raise InvalidRequestError("chat.messages: rsa needs the conversation to end with the"
                                      " problem, a user message", "chat.messages")
        try:
            text, ids = tokenizer.render_chat(messages, add_generation_prompt=True)
        except ValueError as err:
            raise InvalidRequestError(f"chat.messages: {err}", "chat.messages") from None
        job = RSAJob(request_id, messages[-1]["content"], text, ids, params,
                     history=messages[:-1], cache_salt=salt)
    else:
        raise InvalidRequestError("input: rsa needs prompt or chat (its problem as text)",
                                  "input")
    return job, preflight(tokenizer, job, limits, client.max_model_len)


def _usage(done: RSADone) -> pb.Usage:
    return pb.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                    total_tokens=done.prompt_tokens + done.completion_tokens,
                    cached_tokens=done.cached_tokens)


def _info(job: RSAJob, done: RSADone, bound: int) -> pb.RSAInfo:
    p = job.params
    info = pb.RSAInfo(n=p.n, k=p.effective_k, t=p.t, tail_tokens=p.tail_tokens, calls=done.calls,
                      max_context=done.max_context, max_context_bound=bound, rounds=[
                          pb.RSARound(round=r.index, calls=r.calls, prompt_tokens=r.prompt_tokens,
                                      cached_tokens=r.cached_tokens,
                                      completion_tokens=r.completion_tokens,
                                      max_context=r.max_context) for r in done.rounds])
    if p.seed is not None:
        info.seed = p.seed
    for traces in done.population or ():
        info.population.append(pb.RSATraces(traces=list(traces)))
    return info


async def rsa_messages(client: EngineClient, events: AsyncIterator[RSAEvent], job: RSAJob,
                       bound: int, model: str,
                       tracker: RequestTracker) -> AsyncIterator[pb.GenerateResponse]:
    """The streamed call's messages (see the module's docstring)."""
    def message(**fields: Any) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=job.request_id, model=model, **fields)

    async for event in events:
        if isinstance(event, RSAProgress):
            yield message(rsa_progress=pb.RSAProgress(
                round=event.round, rounds=event.rounds, calls_done=event.calls_done,
                calls_total=event.calls_total))
        elif isinstance(event, RSAAnswerDelta):
            tracker.on_delta(event.index, event.delta)
            outputs = [delta_pb(client, None, event.index, c.text, list(c.token_ids), None,
                                c.finish_reason, c.stop_reason)
                       for c in event.delta.completions if c.text or c.token_ids or
                       c.finish_reason]
            if outputs:
                yield message(outputs=outputs)
        else:
            record_run(tracker, job, event)
            yield message(finished=True, usage=_usage(event), rsa=_info(job, event, bound))
            return
    raise unfinished()


async def rsa_unary(client: EngineClient, events: AsyncIterator[RSAEvent], job: RSAJob,
                    bound: int, model: str, tracker: RequestTracker) -> pb.GenerateResponse:
    answers, done = await collect_run(events, job, tracker)
    return pb.GenerateResponse(
        request_id=job.request_id, model=model, finished=True, usage=_usage(done),
        rsa=_info(job, done, bound), outputs=[
            delta_pb(client, None, i, c.text, c.token_ids, None, c.finish_reason, c.stop_reason)
            for i, c in enumerate(answers)])
