"""What a structured-output request asks for (vLLM's `StructuredOutputsParams`).

Exactly one kind of constraint per request: a JSON schema, any JSON object, a regular
expression, one of a list of strings, or an EBNF grammar. This module only validates and
normalises the request; `grammar` compiles it (with xgrammar, an optional dependency).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zayaserve.replicas.validation_errors import ParamError

__all__ = ["KINDS", "MAX_CONSTRAINT_CHARS", "StructuredOutputsParams"]

# A constraint is compiled on the server: bound its size so that one request cannot make the
# compiler (and its cache) work on megabytes.
MAX_CONSTRAINT_CHARS = 65_536
MAX_CHOICES = 1024

KINDS = ("json", "regex", "choice", "grammar", "json_object")
_NAME = "structured_outputs"


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One constraint on a completion's text; set exactly one of the kinds.

    ``json`` is a JSON schema (an object, or its JSON text; kept as compact JSON text in
    the order given: xgrammar writes properties in that order), ``json_object`` any JSON object,
    ``regex`` a regular expression the whole text matches, ``choice`` a list of allowed
    texts, ``grammar`` an EBNF grammar whose start rule is ``root``. With
    ``disable_any_whitespace`` JSON is written without optional whitespace.
    """

    json: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ParamError(f"{_NAME}.json_object", "json_object must be a bool")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ParamError(f"{_NAME}.disable_any_whitespace",
                             "disable_any_whitespace must be a bool")
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ParamError(_NAME, f"{_NAME} must set exactly one of {', '.join(KINDS)}; "
                             f"got {', '.join(set_kinds) or 'none'}")
        object.__setattr__(self, "json", _schema_text(self.json))
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ParamError(f"{_NAME}.{kind}", f"{kind} must be a non-empty string")
        object.__setattr__(self, "choice", _choices(self.choice))
        if self.size > MAX_CONSTRAINT_CHARS:
            raise ParamError(_NAME, f"{_NAME}: the constraint has {self.size} characters, "
                             f"more than the {MAX_CONSTRAINT_CHARS} allowed")

    @classmethod
    def of(cls, value: StructuredOutputsParams | Mapping[str, Any]) -> StructuredOutputsParams:
        """From a mapping of vLLM's field names (unknown names are an error)."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, Mapping):
            raise ParamError(_NAME, f"{_NAME} must be an object, got {type(value).__name__}")
        known = {*KINDS, "disable_any_whitespace"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ParamError(f"{_NAME}.{unknown[0]}",
                             f"{_NAME}.{unknown[0]}: unknown field (known: {sorted(known)})")
        return cls(**dict(value))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def size(self) -> int:
        return sum(len(v) for v in (self.json, self.regex, self.grammar) if v) + sum(
            len(c) for c in self.choice or ())


def _schema_text(schema: object) -> str | None:
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ParamError(f"{_NAME}.json", f"json: not valid JSON ({e})") from e
    if not isinstance(schema, Mapping | bool):
        raise ParamError(f"{_NAME}.json", "json must be a JSON schema (an object)")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _choices(choice: object) -> tuple[str, ...] | None:
    if choice is None:
        return None
    if isinstance(choice, str) or not isinstance(choice, Sequence):
        raise ParamError(f"{_NAME}.choice", "choice must be a list of strings")
    items = tuple(choice)
    if not items or len(items) > MAX_CHOICES:
        raise ParamError(f"{_NAME}.choice", f"choice must list 1 to {MAX_CHOICES} strings")
    if not all(isinstance(c, str) and c for c in items):
        raise ParamError(f"{_NAME}.choice", "choice entries must be non-empty strings")
    return items
