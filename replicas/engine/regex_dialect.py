"""Regular expressions as EBNF whose language is what Python accepts.

A `regex` constraint means what `re.fullmatch` means by it, and a JSON schema's `pattern` what
`jsonschema` (Python's `re.search`) means by it. xgrammar reads regexes its own way: its `.`
matches a newline, its `\\S`, `\\W`, `\\D` admit characters Python's refuse, its character sets
admit encoded UTF-16 surrogates (bytes no UTF-8 decoder accepts), and in JSON strings its sets
admit overlong encodings (as does any `Regex(...)` inside its EBNF). So the pattern is parsed by
Python's own parser and written as an EBNF expression: every set spelled out as code point
ranges (a category as a subset of Python's where the set is positive, a superset where it is
negated, so the language only shrinks), `.` as "anything but a newline", surrogates never.

In a JSON string (`json_string=True`) the expression is over the string's JSON text: `"`, `\\`
and control characters in the pattern's literals are written as escapes, and sets leave them
out. Anchors count only at the ends (the grammar matches the whole string either way);
backreferences and lookarounds cannot be a grammar and are refused.
"""

from __future__ import annotations

import re
import re._constants as C  # noqa: N812
import re._parser as sre
from collections.abc import Iterable
from typing import cast

__all__ = ["regex_ebnf"]

MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
Ranges = list[tuple[int, int]]

# Python's whitespace (str.isspace): \s in a negated set must exclude all of it.
_PY_SPACE: Ranges = [(0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
                     (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
                     (0x3000, 0x3000)]
_ASCII_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_NON_ASCII: Ranges = [(0x80, MAX_CODE_POINT)]


def _union(*parts: Iterable[tuple[int, int]]) -> Ranges:
    merged: Ranges = []
    for lo, hi in sorted(r for part in parts for r in part):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in _union(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return out


# Each category as (inside Python's set, containing Python's set).
_CATEGORIES: dict[object, tuple[Ranges, Ranges]] = {
    C.CATEGORY_DIGIT: ([(0x30, 0x39)], _union([(0x30, 0x39)], _NON_ASCII)),
    C.CATEGORY_WORD: (_ASCII_WORD, _union(_ASCII_WORD, _NON_ASCII)),
    C.CATEGORY_SPACE: (_PY_SPACE, _PY_SPACE),
}
for _positive, _negative in ((C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT),
                             (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD),
                             (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE)):
    _inner, _outer = _CATEGORIES[_positive]
    _CATEGORIES[_negative] = (_complement(_outer), _complement(_inner))


class _Writer:
    def __init__(self, json_string: bool) -> None:
        self.json_string = json_string
        # What a set may never hold: surrogates, and in JSON text what must be escaped.
        self.never: Ranges = [_SURROGATES]
        if json_string:
            self.never = _union(self.never, [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)])

    def pattern(self, items: sre.SubPattern | list, top: bool = False) -> str:
        """An EBNF sequence for the items."""
        items = list(items)
        if top:  # anchors at the ends: the grammar matches the whole text anyway
            while items and items[0] in _STARTS:
                items.pop(0)
            while items and items[-1] in _ENDS:
                items.pop()
        parts = [self.item(op, av) for op, av in items]
        return "(" + " ".join(parts) + ")" if parts else '""'

    def item(self, op: object, av: object) -> str:
        if op is C.LITERAL:
            return self.literal(int(av))  # type: ignore[call-overload]
        if op is C.NOT_LITERAL:
            return self.ranges(_complement([(int(av), int(av))]))  # type: ignore[call-overload]
        if op is C.ANY:
            return self.ranges(_complement([(0x0A, 0x0A)]))
        if op is C.IN:
            return self.ranges(self.set_ranges(av))  # type: ignore[arg-type]
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, hi, sub = cast(tuple[int, object, list], av)
            bound = -1 if hi is C.MAXREPEAT else hi
            return f"{self.pattern(sub)}{{{lo}, {bound}}}"
        if op is C.SUBPATTERN:
            return self.pattern(av[-1])  # type: ignore[index]
        if op is C.BRANCH:
            return "(" + " | ".join(self.pattern(b) for b in av[1]) + ")"  # type: ignore[index]
        if op is C.ATOMIC_GROUP:
            return self.pattern(av)  # type: ignore[arg-type]
        raise ValueError(f"{_NAMES.get(op, str(op))} cannot be part of a grammar")

    def set_ranges(self, members: list[tuple[object, object]]) -> Ranges:
        negate = bool(members) and members[0][0] is C.NEGATE
        parts: list[Ranges] = []
        for op, av in members[1:] if negate else members:
            if op is C.LITERAL:
                parts.append([(int(av), int(av))])  # type: ignore[call-overload]
            elif op is C.RANGE:
                parts.append([(int(av[0]), int(av[1]))])  # type: ignore[index]
            elif op is C.CATEGORY:
                inner, outer = _CATEGORIES[av]
                parts.append(outer if negate else inner)
            else:
                raise ValueError(f"{op} inside a set cannot be part of a grammar")
        ranges = _union(*parts)
        return _complement(ranges) if negate else ranges

    def literal(self, cp: int) -> str:
        if _SURROGATES[0] <= cp <= _SURROGATES[1]:
            raise ValueError(f"U+{cp:04X} is a surrogate, not a character")
        if self.json_string and (cp < 0x20 or cp in (0x22, 0x5C)):
            return f'"\\\\u{cp:04x}"'  # the JSON escape, as text
        return f'"{_escape_char(cp, specials=_STRING_SPECIALS)}"'

    def ranges(self, ranges: Ranges) -> str:
        allowed = _union(ranges)
        for lo, hi in self.never:
            allowed = _union(_cut(allowed, lo, hi))
        if not allowed:
            raise ValueError("a set allows no character a JSON string can hold raw")
        body = "".join(_escape_char(lo) if lo == hi else
                       f"{_escape_char(lo)}-{_escape_char(hi)}" for lo, hi in allowed)
        return f"[{body}]"


def _cut(ranges: Ranges, lo: int, hi: int) -> Ranges:
    out = []
    for a, b in ranges:
        if b < lo or a > hi:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo - 1))
        if b > hi:
            out.append((hi + 1, b))
    return out


def _escape_char(cp: int, specials: str = '\\"[]^-') -> str:
    """One code point inside an EBNF set (or, with specials `\\"`, string)."""
    if cp < 0x20 or cp == 0x7F or cp <= 0xFFFF and not chr(cp).isprintable():
        return f"\\u{cp:04x}"
    ch = chr(cp)
    return "\\" + ch if ch in specials else ch


_STRING_SPECIALS = '\\"'
_STARTS = ((C.AT, C.AT_BEGINNING), (C.AT, C.AT_BEGINNING_STRING))
_ENDS = ((C.AT, C.AT_END), (C.AT, C.AT_END_STRING))
_NAMES = {C.GROUPREF: "a backreference", C.GROUPREF_EXISTS: "a conditional group",
          C.ASSERT: "a lookahead or lookbehind", C.ASSERT_NOT: "a lookahead or lookbehind",
          C.AT: "an anchor inside the pattern"}


def regex_ebnf(pattern: str, *, json_string: bool = False) -> str:
    """An EBNF expression for `pattern`: its language is Python's (or a part of it), with no
    surrogate; with `json_string`, as the text of a JSON string. A pattern that cannot be a
    grammar, or that Python cannot parse, is a ValueError saying why."""
    try:
        parsed = sre.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"not a valid regular expression ({e})") from e
    if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
        raise ValueError("inline flags such as (?i) cannot be part of a grammar")
    return _Writer(json_string).pattern(parsed, top=True)
