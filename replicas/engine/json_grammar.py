"""Grammars whose strings are JSON strings and whose characters are characters, whatever the
grammar engine writes.

xgrammar (0.2.9) gets three things wrong, each of which lets a model write text that a strict
parser refuses while the grammar completes:
- a string with `minLength`/`maxLength` repeats `[^"\\\r\n]`, which lets raw control characters
  (forbidden inside JSON strings) through and has no escapes;
- a string `pattern` is written into the JSON text with its literals raw (a `"`, `\\` or newline
  in the pattern ends up unescaped in the string) and its sets unbounded, or matched in a mode
  that accepts overlong UTF-8;
- every negated set admits encoded UTF-16 surrogates, bytes no UTF-8 decoder accepts.
So a schema's grammar is built here as EBNF text: each `pattern` is replaced by a placeholder
before xgrammar converts the schema and by a rule of our own after (regex_dialect.py writes the
pattern as EBNF over JSON text), every string-character rule becomes JSON's own, and every
negated set leaves surrogates out. `grammar_defects` is the check that keeps this true.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from zayaserve.replicas.engine.regex_dialect import regex_ebnf

__all__ = [
    "FORMAT_PATTERNS", "JSON_STRING_CHAR", "grammar_defects", "json_schema_ebnf",
    "without_surrogates",
]

_HEX = "[0-9A-Fa-f]"
_NO_SURROGATES = r"\ud800-\udfff"
# One character of a JSON string's text, as RFC 8259 has it (surrogate escapes excluded: a pair
# decodes to one character but would count as two against a length).
JSON_STRING_CHAR = (
    r'(([^\0-\x1f\"\\' + _NO_SURROGATES + r']) | ("\\" ([\"\\/bfnrt] | "u" '
    + f"([0-9A-Ca-cE-Fe-f] {_HEX} {_HEX} {_HEX}) | \"u\" [Dd] [0-7] {_HEX} {_HEX})))"
)
# A rule whose whole body is one negated set: xgrammar's length-bounded string characters.
_CLASS_RULE = re.compile(r"^(?P<name>[\w-]+) ::= \(\(\[\^(?P<body>(?:\\.|[^\]\\])*)\]\)\)$")
# A string literal or a set of the printed EBNF, escapes kept whole.
_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')
# Schema keywords that constrain a string's text besides `pattern`: with a pattern, refused.
_TEXT_KEYWORDS = ("minLength", "maxLength", "format", "enum", "const")
_BYTE = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_LEAP_YEAR = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_YEAR = "(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = ("((0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])|(0[13-9]|1[0-2])-(29|30)"
              "|(0[13578]|1[02])-31)")
# Formats whose exact language a pattern can state (what Python's checks accept: `date`
# as datetime.date.fromisoformat, `ipv4` as ipaddress without leading zeros); xgrammar's own
# are looser (any day 31, octets like 008). Other formats keep xgrammar's rules.
FORMAT_PATTERNS = {
    "date": f"^({_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)$",
    "ipv4": f"^({_BYTE}\\.){{3}}{_BYTE}$",
    "uuid": "^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$",
}


def _is_string_class(body: str) -> bool:
    """A negated set that refuses the quote and the backslash: it spells string text."""
    return '\\"' in body and "\\\\" in body


def without_surrogates(ebnf: str) -> str:
    """Every negated set of a printed grammar, leaving UTF-16 surrogates out too."""
    def patch(m: re.Match[str]) -> str:
        token = m.group(0)
        if token.startswith("[^") and _NO_SURROGATES not in token:
            return token[:-1] + _NO_SURROGATES + "]"
        return token
    return _TOKEN.sub(patch, ebnf)


def _take_patterns(node: Any, found: dict[str, str]) -> Any:
    """The schema with each string `pattern` (or a `format` written as one) replaced by a
    unique constant, recorded in `found` with its pattern."""
    if isinstance(node, list):
        return [_take_patterns(item, found) for item in node]
    if not isinstance(node, dict):
        return node
    pattern, fmt = node.get("pattern"), node.get("format")
    if node.get("type", "string") == "string" and (isinstance(pattern, str) or fmt):
        others = [k for k in _TEXT_KEYWORDS if k in node and k != "format"]
        if others:
            what = "pattern" if isinstance(pattern, str) else "format"
            raise ValueError(f"a string's {what} cannot be combined with {others[0]}")
        if isinstance(pattern, str) and fmt:
            raise ValueError("a string's pattern cannot be combined with format")
        pattern = pattern if isinstance(pattern, str) else FORMAT_PATTERNS.get(str(fmt))
        if pattern is not None:
            placeholder = f"zspattern{secrets.token_hex(8)}"
            found[placeholder] = pattern
            kept = {k: v for k, v in node.items() if k not in ("pattern", "format", "type")}
            return {**kept, "const": placeholder}
    return {key: _take_patterns(value, found) for key, value in node.items()}


def _ebnf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def json_schema_ebnf(xgr: Any, schema: str, **options: Any) -> str:
    """The EBNF text of `schema`'s grammar (xgrammar's conversion, `options` as its
    `from_json_schema` takes them), with strings, patterns and sets made right. A schema whose
    pattern cannot be a grammar is a ValueError."""
    patterns: dict[str, str] = {}
    converted = _take_patterns(json.loads(schema), patterns)
    text = str(xgr.Grammar.from_json_schema(json.dumps(converted), **options))
    lines = []
    for line in text.splitlines():
        m = _CLASS_RULE.match(line)
        if m and _is_string_class(m["body"]):
            line = f"{m['name']} ::= {JSON_STRING_CHAR}"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    for i, (placeholder, pattern) in enumerate(patterns.items()):
        literal = _ebnf_string(json.dumps(placeholder))
        if literal not in text:
            raise ValueError(f"the grammar of pattern {pattern!r} could not be placed")
        rule = f"zs_pattern_{i}"
        text = text.replace(literal, f"{rule}")
        quote = _ebnf_string('"')
        text += f"{rule} ::= ({quote} {regex_ebnf(pattern, json_string=True)} {quote})\n"
    return without_surrogates(text)


def grammar_defects(ebnf: str) -> list[str]:
    """Lines of a printed grammar that could put a character JSON forbids raw inside a string,
    or an encoded surrogate anywhere."""
    defects = []
    for line in ebnf.splitlines():
        for token in _TOKEN.findall(line):
            if not token.startswith("[^"):
                continue
            body = token[2:-1]
            json_unsafe = _is_string_class(body) and "\\0-\\x1f" not in body
            if json_unsafe or _NO_SURROGATES not in body:
                defects.append(line)
                break
    return defects
