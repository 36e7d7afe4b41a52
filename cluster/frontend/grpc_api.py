"""The public gRPC front end (`zayaserve.v1.Generation`) over any `EngineClient`, with the
standard health service and server reflection. It applies the same checks as the REST front
end; a bad field is INVALID_ARGUMENT naming it, overload is RESOURCE_EXHAUSTED, an unknown
model NOT_FOUND. A client that cancels its call cancels the request (its blocks are freed)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from zayaserve.cluster.frontend.api_keys import ApiKeys
from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.frontend_errors import (
    FrontendError,
    InvalidRequestError,
    as_frontend_error,
    internal_error,
)
from zayaserve.cluster.frontend.grpc_messages import delta_pb, usage_pb
from zayaserve.cluster.frontend.grpc_params import RENAMES, sampling_params
from zayaserve.cluster.frontend.grpc_rsa import rsa_job, rsa_messages, rsa_unary
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.cluster.frontend.request_checks import (
    check_context_length,
    check_token_ids,
    served_model,
)
from zayaserve.cluster.frontend.request_tracker import RequestTracker
from zayaserve.cluster.frontend.response_budget import (
    DEFAULT_MAX_RESPONSE_LOGPROBS,
    check_response_budget,
    logprob_entries,
)
from zayaserve.cluster.frontend.rsa_request import tenant_limited
from zayaserve.cluster.frontend.streams import aclose_quietly, collect, open_stream
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.observability.safe_text import cap, log_safe
from zayaserve.replicas.observability.tracing import metadata_carrier
from zayaserve.replicas.rsa.serving import RSALimits

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Status details travel in the trailers (a client drops the call past 16 KiB of them, UTF-8
# percent-encoded): an error that quotes client text (an unknown model name) is cut to this.
_MAX_DETAILS_CHARS = 1024

_STATUS_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
}
class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, client: EngineClient, *, api_key: str | None = None,
                 api_keys: list[str] | None = None,
                 served_model_names: list[str] | None = None,
                 metrics: MetricsCollector | None = None,
                 rsa_limits: RSALimits | None = None,
                 max_response_logprobs: int = DEFAULT_MAX_RESPONSE_LOGPROBS) -> None:
        self.client = client
        self.rsa_limits = rsa_limits or RSALimits()
        self.max_response_logprobs = max_response_logprobs
        self.served_model_names = list(served_model_names or [client.model_name])
        self.metrics = metrics or MetricsCollector()  # a private registry when not shared
        self._keys = ApiKeys.of(api_key, api_keys)

    def _track(self, endpoint: str, request: pb.GenerateRequest,
               context: grpc.aio.ServicerContext) -> RequestTracker:
        """The call's tracker, traced under the client's W3C context in the metadata. Make it
        only once the caller is let in: a caller without a key leaves no span."""
        operation = "chat" if request.WhichOneof("input") == "chat" else "text_completion"
        return self.metrics.track(endpoint, operation,
                                  cap(request.model or self.served_model_names[0]),
                                  metadata_carrier(context.invocation_metadata()))

    def _authorize(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant (None without keys), or AuthenticationError."""
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        return self._keys.tenant(given)

    def _prepare(self, request: pb.GenerateRequest, tenant: str | None
                 ) -> tuple[str, str, str | None, list[int], SamplingParams]:
        """(model, request id, prompt text, prompt ids, params), or a FrontendError."""
        model = served_model(request.model or None, self.served_model_names)
        tokenizer = self.client.tokenizer
        which = request.WhichOneof("input")
        text: str | None
        if which == "prompt":
            text, field = request.prompt, "prompt"
            ids = tokenizer.encode(text)
        elif which == "prompt_token_ids":
            text, field, ids = None, "prompt_token_ids", list(request.prompt_token_ids.ids)
            check_token_ids(self.client, ids, field)
        elif which == "chat":
            field = "chat"
            messages = [{"role": m.role, "content": m.content}
                        for m in request.chat.messages]
            try:  # as LLM.chat: special-token strings in the messages stay plain text
                text, ids = tokenizer.render_chat(messages, add_generation_prompt=True)
            except ValueError as err:
                raise as_frontend_error(err, {"messages": "chat.messages"}, "chat") from None
        else:
            raise InvalidRequestError("input: set one of prompt, prompt_token_ids or chat",
                                      "input")
        params = sampling_params(request, tenant)
        check_context_length(self.client, len(ids), params.max_tokens, field,
                             "sampling.max_tokens")
        check_response_budget(logprob_entries(
            [len(ids)], params.n, params.max_tokens, self.client.max_model_len, params.logprobs,
            params.prompt_logprobs), self.max_response_logprobs, "sampling.logprobs")
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        return model, request_id, text, ids, params

    async def _fail(self, context: grpc.aio.ServicerContext, err: BaseException,
                    endpoint: str, request: pb.GenerateRequest) -> None:
        try:
            frontend_err: FrontendError = as_frontend_error(err, RENAMES)
        except Exception:  # not the request's fault: logged with the client's id, escaped
            where = endpoint + (f" request_id={log_safe(request.request_id)}"
                                if request.request_id else "")
            frontend_err = internal_error(err, where)
        status = _STATUS_OF_HTTP.get(frontend_err.status, grpc.StatusCode.INTERNAL)
        message = frontend_err.message
        if frontend_err.param and not message.startswith(frontend_err.param):
            message = f"{frontend_err.param}: {message}"
        self._count(endpoint, status)
        await context.abort(status, cap(message, _MAX_DETAILS_CHARS))

    def _count(self, endpoint: str, status: grpc.StatusCode) -> None:
        self.metrics.count_request(endpoint, status.name)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        endpoint = "grpc.Generate"
        try:
            tenant = self._authorize(context)
        except Exception as err:
            await self._fail(context, err, endpoint, request)
            return
        tracker = self._track(endpoint, request, context)
        iterator: AsyncIterator[Any] | None = None
        served = False
        failure: Exception | None = None
        try:
            if request.HasField("rsa"):
                model = served_model(request.model or None, self.served_model_names)
                job, bound = rsa_job(request, self.client, tenant, self.rsa_limits)
                iterator = tenant_limited(self.client, tenant,
                                          self.rsa_limits.max_runs_per_tenant,
                                          self.client.rsa(job))
                async for answer in rsa_messages(self.client, iterator, job, bound, model,
                                                 tracker):
                    yield answer
                self._count(endpoint, grpc.StatusCode.OK)
                served = True
                return
            model, request_id, text, ids, params = self._prepare(request, tenant)
            tracker.describe(params, cap(request_id))
            delta, iterator = await open_stream(self.client, request_id, ids, params, text)
            tracker.on_prompt(len(ids))
            usage = pb.Usage(prompt_tokens=len(ids))
            while True:
                message = pb.GenerateResponse(request_id=request_id, model=model,
                                              finished=delta.finished)
                if delta.prompt_token_ids is not None:
                    message.prompt_token_ids.extend(delta.prompt_token_ids)
                for c in delta.completions:
                    if c.text or c.token_ids or c.finish_reason:
                        message.outputs.append(delta_pb(
                            self.client, params, c.index, c.text, list(c.token_ids),
                            list(c.logprobs) if c.logprobs is not None else None,
                            c.finish_reason, c.stop_reason))
                    usage.completion_tokens += len(c.token_ids)
                tracker.on_delta(0, delta)
                if delta.finished:
                    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                    message.usage.CopyFrom(usage)
                if delta.prompt_token_ids is not None or message.outputs or delta.finished:
                    yield message
                if delta.finished:
                    break
                delta = await iterator.__anext__()
            self._count(endpoint, grpc.StatusCode.OK)
            served = True
        except Exception as err:
            failure = err
            await self._fail(context, err, endpoint, request)
        finally:
            if iterator is not None:
                await aclose_quietly(iterator)  # on cancel: aborts the request, frees blocks
            tracker.finish(served, failure)

    async def GenerateUnary(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        endpoint = "grpc.GenerateUnary"
        try:
            tenant = self._authorize(context)
        except Exception as err:
            await self._fail(context, err, endpoint, request)
            raise AssertionError("unreachable: abort raises") from err
        tracker = self._track(endpoint, request, context)
        try:
            if request.HasField("rsa"):
                model = served_model(request.model or None, self.served_model_names)
                job, bound = rsa_job(request, self.client, tenant, self.rsa_limits)
                answer = await rsa_unary(self.client, tenant_limited(
                    self.client, tenant, self.rsa_limits.max_runs_per_tenant,
                    self.client.rsa(job)), job, bound, model, tracker)
                tracker.finish()
                self._count(endpoint, grpc.StatusCode.OK)
                return answer
            model, request_id, text, ids, params = self._prepare(request, tenant)
            tracker.describe(params, cap(request_id))
            [out] = await collect(self.client, [(request_id, ids, text)], params,
                                  tracker.on_delta)
        except BaseException as err:
            tracker.finish(served=False, error=err if isinstance(err, Exception) else None)
            if not isinstance(err, Exception):
                raise  # cancelled by the client: nothing to answer
            await self._fail(context, err, endpoint, request)
            raise AssertionError("unreachable: abort raises") from err
        tracker.on_prompt(len(ids))
        tracker.finish()
        self._count(endpoint, grpc.StatusCode.OK)
        return pb.GenerateResponse(
            request_id=request_id, model=model, finished=True, usage=usage_pb(out),
            prompt_token_ids=out.prompt_token_ids,
            outputs=[delta_pb(self.client, params, c.index, c.text, c.token_ids, c.logprobs,
                               c.finish_reason, c.stop_reason) for c in out.outputs])
