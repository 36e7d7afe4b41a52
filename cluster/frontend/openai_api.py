"""The OpenAI-compatible REST front end over any `EngineClient`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /v1/cluster/placement (bearer key when keys are set), GET /version,
GET /health, GET /metrics.
Every error, whoever raises it, leaves as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zayaserve.cluster.control.admin_auth import AdminAuth
from zayaserve.cluster.control.cluster_api import add_cluster_routes
from zayaserve.cluster.frontend.api_keys import ApiKeys
from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.frontend_errors import (
    BodyTooLargeError,
    FrontendError,
    InvalidRequestError,
    UnavailableError,
    internal_error,
)
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.cluster.frontend.openai_chat import create_chat_completion
from zayaserve.cluster.frontend.openai_chat_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from zayaserve.cluster.frontend.openai_completions import create_completion
from zayaserve.cluster.frontend.openai_completions_protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from zayaserve.cluster.frontend.openai_protocol import (
    NOT_SUPPORTED,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    unknown_fields,
)
from zayaserve.cluster.frontend.openai_rsa import create_rsa_chat_completion
from zayaserve.cluster.frontend.openapi_schema import (
    GENERATION_ERRORS,
    openapi_request_body,
    openapi_responses,
)
from zayaserve.cluster.frontend.response_budget import DEFAULT_MAX_RESPONSE_LOGPROBS
from zayaserve.cluster.frontend.rsa_request import rsa_params_of
from zayaserve.cluster.frontend.serving_context import ServingContext
from zayaserve.cluster.frontend.streams import error_response_of
from zayaserve.cluster.frontend.utility_api import add_utility_routes
from zayaserve.replicas.observability.safe_text import log_safe
from zayaserve.replicas.rsa.serving import RSALimits

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# Paths counted under their own name in zayaserve_requests_total; anything else is "other",
# so scanners probing random URLs cannot blow up the label set.
_COUNTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                            "/metrics"})
# An engine that cannot answer stats() in this long is stuck, not busy (a step is far shorter).
_HEALTH_TIMEOUT_S = 10.0
_STATS_TIMEOUT_S = 5.0
# pydantic names union members and wrappers in error locations; they are not request fields.
_TYPE_TAG_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})


def _error_json(err: FrontendError) -> JSONResponse:
    return JSONResponse(error_response_of(err).model_dump(), status_code=err.status,
                        headers=err.headers)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not (
                part in _TYPE_TAG_NAMES or not part[:1].islower() or any(c in part for c in "[(-")):
            path += f".{part}" if path else part
    return path or None


def _validation_error(err: ValidationError) -> InvalidRequestError:
    errors = err.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"malformed JSON body: {first.get('ctx', {}).get('error', '')}")
    param = _field_path(tuple(first["loc"]))
    if first["type"] == "model_type" and param is None:
        return InvalidRequestError("the request body must be a JSON object")
    if first["type"] == "extra_forbidden":
        # The unknown key ends the location whatever it looks like ("X-Foo", "a-b", "").
        parent, key = _field_path(tuple(first["loc"][:-1])), str(first["loc"][-1])
        param = f"{parent}.{key}" if parent else key
        message = "unrecognized request argument (not supported by this server)"
    else:
        # A union field fails once per accepted type, all at the same path: list them all.
        same_field = [str(e["msg"]).removeprefix("Value error, ") for e in errors
                      if _field_path(tuple(e["loc"])) == param]
        message = "; or ".join(dict.fromkeys(same_field))
    return InvalidRequestError(f"{param}: {message}" if param else message, param)


async def _read_body(request: Request, limit: int, model: type[M], strict: bool = False) -> M:
    """The body as `model`, refusing anything over `limit` bytes before it is all read; fields
    the model does not know are refused in strict mode, else logged and ignored."""
    body = await _parse_body(request, limit, model)
    extra = unknown_fields(body)
    # At any depth, as the schema says (e.g. `audio` in a message).
    refused = [name for name in extra if name.rsplit(".", 1)[-1] in NOT_SUPPORTED]
    if refused:
        raise InvalidRequestError(f"{refused[0]}: not supported by this server yet",
                                  refused[0])
    if extra and strict:
        raise InvalidRequestError(f"{extra[0]}: unrecognized request argument", extra[0])
    if extra:
        names = ", ".join(log_safe(name, 64) for name in extra[:10])
        logger.warning("%s: ignored unknown request fields: %s%s", request.url.path, names,
                       " ..." if len(extra) > 10 else "")
    return body


async def _parse_body(request: Request, limit: int, model: type[M]) -> M:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {declared} bytes exceeds {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody will read the answer; just don't log a 500
        raise InvalidRequestError("the client disconnected while sending the body") from None
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as err:
        raise _validation_error(err) from None


class _CountRequests:
    """Counts every HTTP answer by path and status (pure ASGI, so streaming and disconnect
    detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: MetricsCollector) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in _COUNTED_PATHS else "other"
        status = 500  # what the client gets if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.count_request(endpoint, status)


def build_openai_app(
    client: EngineClient,
    *,
    api_key: str | None = None,
    api_keys: list[str] | None = None,
    metrics_need_key: bool = False,
    max_body_bytes: int = 1_000_000,
    served_model_names: list[str] | None = None,
    metrics: MetricsCollector | None = None,
    max_prompts: int = 64,
    strict_fields: bool = False,
    reasoning_parser: str | None = None,
    tool_call_parser: str | None = "hermes",
    rsa_limits: RSALimits | None = None,
    admin_api_keys: list[str] | None = None,
    max_response_logprobs: int = DEFAULT_MAX_RESPONSE_LOGPROBS,
) -> FastAPI:
    """The REST app. `served_model_names` are the ids clients may pass as `model` (default: the
    engine client's model name); `metrics` lets several front ends share one registry;
    `max_prompts` bounds the prompts of one completions request, `rsa_limits` what one RSA
    request may cost, `max_response_logprobs` the logprob entries of one response
    (response_budget.py). The admin routes need one of `admin_api_keys` (none: loopback callers
    only; admin_auth.py)."""
    names = list(served_model_names or [client.model_name])
    metrics = metrics or MetricsCollector()
    ctx = ServingContext(client, names, metrics, max_prompts, reasoning_parser,
                         tool_call_parser, rsa_limits or RSALimits(), max_response_logprobs)
    app = FastAPI(title="zayaserve", description="OpenAI-compatible API for ZAYA1 models")
    app.state.serving = ctx
    app.add_middleware(_CountRequests, metrics=metrics)
    keys = ApiKeys.of(api_key, api_keys)

    def authorize(request: Request) -> str | None:
        """The caller's tenant (None without keys); 401 for a missing or wrong key."""
        return keys.tenant(request.headers.get("authorization"))

    @app.exception_handler(FrontendError)
    async def on_frontend_error(_: Request, err: FrontendError) -> JSONResponse:
        return _error_json(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=str(err.detail),
                                               type="invalid_request_error"))
        return JSONResponse(body.model_dump(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        return _error_json(internal_error(err, request.url.path))

    # The handlers read their own bodies: the decorators declare them, and every answer.
    @app.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest),
              responses=openapi_responses(CompletionResponse, errors=GENERATION_ERRORS,
                                          stream_chunk=CompletionStreamResponse))
    async def completions(request: Request) -> Response:
        tenant = authorize(request)
        body = await _read_body(request, max_body_bytes, CompletionRequest, strict_fields)
        return await create_completion(body, ctx, request, tenant)

    @app.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatCompletionRequest),
              responses=openapi_responses(ChatCompletionResponse, errors=GENERATION_ERRORS,
                                          stream_chunk=ChatCompletionStreamResponse))
    async def chat_completions(request: Request) -> Response:
        tenant = authorize(request)
        body = await _read_body(request, max_body_bytes, ChatCompletionRequest, strict_fields)
        rsa = rsa_params_of(body)
        if rsa is not None:
            return await create_rsa_chat_completion(body, rsa, ctx, request, tenant)
        return await create_chat_completion(body, ctx, request, tenant)

    add_utility_routes(app, ctx, authorize,
                       lambda request, model: _read_body(request, max_body_bytes, model,
                                                         strict_fields))
    admin = AdminAuth(admin_api_keys or [], keys)
    add_cluster_routes(app, ctx, admin.check,
                       lambda request, model: _read_body(request, max_body_bytes, model, True))

    @app.get("/v1/models", responses=openapi_responses(ModelList, errors=(401, 500)))
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        cards = [ModelCard(id=name, max_model_len=client.max_model_len) for name in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health", response_class=Response, responses=openapi_responses(
        None, ok_description="Healthy (empty body).", errors=(500, 503)))
    async def health() -> Response:
        try:
            await asyncio.wait_for(client.check_health(), _HEALTH_TIMEOUT_S)
        except Exception as err:
            return _error_json(UnavailableError(
                f"engine unhealthy ({type(err).__name__})", retry_after_s=1))
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses=openapi_responses(None, ok_description="Prometheus text format.",
                                         errors=(401, 500)))
    async def metrics_text(request: Request) -> Response:
        if metrics_need_key:  # the counters say how busy the service is: keep them private
            authorize(request)
        try:
            stats = await asyncio.wait_for(client.stats(), _STATS_TIMEOUT_S)
        except Exception:
            logger.warning("engine stats() failed; /metrics shows front-end metrics only")
            stats = None
        metrics.update_engine_stats(stats)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
