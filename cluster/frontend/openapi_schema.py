"""The OpenAPI description of the REST routes. The generation routes read and validate their
bodies themselves (to bound their size and answer in OpenAI's error shape), so FastAPI cannot
see their models: these helpers declare the bodies and every answer for the route decorators."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel

from zayaserve.cluster.frontend.openai_protocol import NOT_SUPPORTED, ErrorResponse

# Every error a route can answer with, all as ErrorResponse.
_ERRORS: dict[int, str] = {
    400: "Invalid request; the message and `param` name the offending field.",
    401: "Missing or wrong API key (only when the server has one).",
    403: "A tenant key on an admin route, or a remote caller while no admin key is set.",
    404: "`model` is not served here (code model_not_found), or no such operation.",
    408: "The engine stopped producing output (code stream_stalled).",
    409: "Another resize operation is running, or the resize would overfill a shard "
         "(code conflict).",
    413: "The request body is too large (code request_too_large).",
    429: "Overloaded, or a resize within the cooldown; retry after Retry-After seconds.",
    500: "Internal error; the server log has the details.",
    503: "The engine is unavailable; retry after Retry-After seconds.",
}
GENERATION_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
    503: {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}},
}


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**defs[ref.removeprefix("#/$defs/")], **rest}, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def _inlined_schema(model: type[BaseModel], mode: Literal["validation", "serialization"]
                    ) -> dict[str, Any]:
    schema = model.model_json_schema(mode=mode)
    defs = schema.pop("$defs", {})
    result: dict[str, Any] = _inline_refs(schema, defs)
    return result


def _sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event of a stream (OpenAPI < 3.2: `schema` describes each event): a JSON
    `chunk`, or an ErrorResponse if it fails after the 200 went out; the last is `[DONE]`."""
    return {
        "type": "object", "required": ["data"],
        "description": f"With stream=true: `data: <{chunk.__name__}>` events (or one "
                       "`data: <ErrorResponse>` if it fails midway), then `data: [DONE]`.",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": {
                "anyOf": [_inlined_schema(chunk, "serialization"),
                          _inlined_schema(ErrorResponse, "serialization")]}},
        ]}},
    }


def _refuse_unsupported(node: Any) -> Any:
    """Request objects that take extra properties (ignored by the server) still refuse the
    names of features it does not honour: the schema says what a 400 is for. Free-form
    objects (a tool's JSON schema, say: no declared properties) take any name."""
    if isinstance(node, dict):
        node = {k: _refuse_unsupported(v) for k, v in node.items()}
        if node.get("additionalProperties") is True and "properties" in node:
            node["propertyNames"] = {"not": {"enum": sorted(NOT_SUPPORTED)}}
        return node
    if isinstance(node, list):
        return [_refuse_unsupported(v) for v in node]
    return node


def openapi_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as the route's required JSON body. The schema is
    inlined: pydantic's `#/$defs/...` references would not resolve inside an OpenAPI document."""
    schema = _refuse_unsupported(_inlined_schema(model, "validation"))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_responses(
    ok: type[BaseModel] | None, *, ok_description: str = "Success.",
    stream_chunk: type[BaseModel] | None = None, errors: Iterable[int] = (500,),
) -> dict[int | str, dict[str, Any]]:
    """`responses` for a route decorator: 200 with `ok` (or no body when None), also as
    server-sent events of `stream_chunk` when given, and each of `errors` as ErrorResponse."""
    success: dict[str, Any] = {"description": ok_description}
    if ok is not None:
        success["model"] = ok
    if stream_chunk is not None:
        success["content"] = {"text/event-stream": {"schema": _sse_event_schema(stream_chunk)}}
    responses: dict[int | str, dict[str, Any]] = {200: success}
    for status in errors:
        responses[status] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses
