"""Constraints of every kind the server accepts, each with the strict check its outputs must
pass: JSON schemas (strings with and without bounds, patterns, formats, enums, nested objects
and arrays) through `json.loads` and `jsonschema` with format checking, regular expressions
through `re.fullmatch`, choices by membership, EBNF grammars by a parser of the same language,
and any JSON object."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]  # structured_outputs, vLLM's field names
    valid: Callable[[str], bool]
    max_tokens: int = 128  # enough for most samples to complete on random weights


def _schema_check(schema: dict[str, Any]) -> Callable[[str], bool]:
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    def check(text: str) -> bool:
        try:
            value = json.loads(text)  # strict: raw control characters in strings are refused
        except json.JSONDecodeError:
            return False
        return validator.is_valid(value)
    return check


def _object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _nested_list(text: str) -> bool:
    """The language of NESTED_GRAMMAR: ( item , item ... ) with items digits or lists."""
    pos = 0

    def lst() -> bool:
        nonlocal pos
        if not text.startswith("(", pos):
            return False
        pos += 1
        while True:
            if text.startswith("(", pos):
                if not lst():
                    return False
            else:
                m = re.compile(r"[0-9]+").match(text, pos)
                if not m:
                    return False
                pos = m.end()
            if text.startswith(",", pos):
                pos += 1
                continue
            if text.startswith(")", pos):
                pos += 1
                return True
            return False
    return lst() and pos == len(text)


NESTED_GRAMMAR = 'root ::= list\nlist ::= "(" item ("," item)* ")"\nitem ::= [0-9]+ | list'
WORDS_GRAMMAR = 'root ::= word (" " word){0,3} "."\nword ::= [a-z]{1,6} | "ZAYA"'

# Unbounded strings are left to json_object and the nested schema's keys: on random weights a
# free string rarely closes within a test's token budget.
_SCHEMAS: dict[str, dict[str, Any]] = {
    "json-maxLength": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16}}, "required": ["city"]},
    "json-minLength": {"type": "object", "properties": {
        "code": {"type": "string", "minLength": 3, "maxLength": 8}}, "required": ["code"]},
    "json-pattern": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,4}$"},
        "tag": {"type": "string", "pattern": "^a.{1,4}b$"},
        "odd": {"type": "string", "pattern": '^"[^a-z]{1,3}\\\\?\\n?$'}},
        "required": ["id", "tag", "odd"]},
    "json-format": {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"},
        "ip": {"type": "string", "format": "ipv4"},
        "uid": {"type": "string", "format": "uuid"}},
        "required": ["day", "ip", "uid"]},
    "json-email": {"type": "object", "properties": {
        "mail": {"type": "string", "format": "email"}}, "required": ["mail"]},
    "json-enum": {"type": "object", "properties": {
        "unit": {"enum": ["celsius", "fahrenheit", "k\u00e9lvin", "a\"b", 3, None]},
        "flag": {"const": "on"}}, "required": ["unit", "flag"]},
    "json-nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "point": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": -5, "maximum": 5},
            "y": {"type": "number"}}, "required": ["x", "y"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "properties": {"k": {"type": "string", "minLength": 1,
                                                   "maxLength": 4},
                                             "v": {"type": "boolean"}},
            "required": ["k", "v"]}}},
        "required": ["name", "point", "items"], "additionalProperties": False},
}
# Compact JSON (no optional whitespace) for the longer schemas: random weights otherwise spend
# their tokens on whitespace runs. The shorter ones keep whitespace, as `response_format` does.
_MAX_TOKENS = {"json-email": 512, "json-nested": 256, "json_object": 256}
_COMPACT = {"json-minLength", "json-pattern", "json-format", "json-email", "json-nested"}
_REGEXES = (r"[A-Z][a-z]{0,8}( [A-Z][a-z]{0,8})?", r"\d{3}-\d{4}", r"a.{1,6}z",
            r"(yes|no|maybe) \(\w{1,5}\)", r"[^,]{1,8},[\s\S]{0,3}!")
_CHOICES = ("Paris", "Zürich", "東京", "New York", "a\"quote", "back\\slash")

CASES: tuple[Case, ...] = (
    *(Case(name, {"json": schema, "disable_any_whitespace": name in _COMPACT},
           _schema_check(schema), _MAX_TOKENS.get(name, 128)) for name, schema in _SCHEMAS.items()),
    Case("json_object", {"json_object": True}, _object, _MAX_TOKENS["json_object"]),
    *(Case(f"regex-{i}", {"regex": rx}, lambda t, rx=rx: re.fullmatch(rx, t) is not None)
      for i, rx in enumerate(_REGEXES)),
    Case("choice", {"choice": list(_CHOICES)}, lambda t: t in _CHOICES),
    Case("grammar-nested", {"grammar": NESTED_GRAMMAR}, _nested_list),
    Case("grammar-words", {"grammar": WORDS_GRAMMAR},
         lambda t: re.fullmatch(r"([a-z]{1,6}|ZAYA)( ([a-z]{1,6}|ZAYA)){0,3}\.", t) is not None),
)
