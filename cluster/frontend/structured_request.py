"""Structured outputs as the OpenAI API asks for them: OpenAI's `response_format` (JSON mode,
JSON schema), vLLM's `structured_outputs` (json, regex, choice, grammar) and its older
`guided_*` fields, all turned into one `StructuredOutputsParams` for the engine."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from zayaserve.cluster.frontend.frontend_errors import InvalidRequestError
from zayaserve.cluster.frontend.structured_protocol import (
    GUIDED_FIELDS,
    ResponseFormat,
    StructuredOutputsField,
)
from zayaserve.replicas.engine.structured import KINDS, StructuredOutputsParams
from zayaserve.replicas.validation_errors import ParamError

__all__ = ["constraint_renames", "structured_spec"]


def _from_response_format(fmt: ResponseFormat) -> StructuredOutputsParams | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError(
            "response_format.json_schema.schema: required with type json_schema",
            "response_format.json_schema.schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)  # type: ignore[arg-type]


def _from_field(field: StructuredOutputsField) -> StructuredOutputsParams:
    given = {name: getattr(field, attr) for name, attr in (
        ("json", "json_"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"),
        ("json_object", "json_object"), ("disable_any_whitespace", "disable_any_whitespace"))}
    return StructuredOutputsParams.of({k: v for k, v in given.items() if v is not None})


def _sources(body: Any) -> list[tuple[str, Callable[[], StructuredOutputsParams | None]]]:
    """(field name, how to build its constraint) for each constraint field the body sets."""
    sources: list[tuple[str, Callable[[], StructuredOutputsParams | None]]] = []
    fmt: ResponseFormat | None = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        sources.append(("response_format", lambda: _from_response_format(fmt)))
    field: StructuredOutputsField | None = getattr(body, "structured_outputs", None)
    if field is not None:
        sources.append(("structured_outputs", lambda: _from_field(field)))
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name, None)
        if value is not None:
            sources.append((name, partial(StructuredOutputsParams.of, {kind: value})))
    return sources


def structured_spec(body: Any) -> StructuredOutputsParams | None:
    """The request's constraint, from whichever one field sets it (two are a 400)."""
    sources = _sources(body)
    if not sources:
        return None
    if len(sources) > 1:
        names = ", ".join(n for n, _ in sources)
        raise InvalidRequestError(f"{sources[1][0]}: only one of {names} may be set",
                                  sources[1][0])
    name, build = sources[0]
    try:
        return build()
    except ParamError as err:
        param = err.param.replace("structured_outputs", name, 1)
        message = str(err).replace("structured_outputs", name, 1)
        raise InvalidRequestError(message, param) from None


def constraint_renames(body: Any, tools_constrain: bool = False) -> dict[str, str]:
    """The engine names a constraint it cannot compile `structured_outputs.<kind>`; these map
    that onto the field the client actually set (a tool's schema: `tools`)."""
    names = [name for name, _ in _sources(body)]
    target = "tools" if tools_constrain else names[0] if names else None
    if target == "response_format" and body.response_format.type == "json_schema":
        target = "response_format.json_schema.schema"
    if target is None or target == "structured_outputs":
        return {}
    return {f"structured_outputs.{kind}": target for kind in KINDS}
