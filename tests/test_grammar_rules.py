"""The grammars the server compiles keep JSON's and Python's rules, checked on the grammar
itself (no sampling): xgrammar's own conversion is shown to break them (so the checks can fail)
and ours not to; every regex's language is inside Python's `re.fullmatch`; bytes no UTF-8
decoder accepts are refused everywhere. The sampling side is tests/test_structured_property.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import xgrammar as xgr  # (the `structured` extra: tests/run.sh installs it)
from structured_cases import _SCHEMAS

from zayaserve.replicas.engine.json_grammar import (
    grammar_defects,
    json_schema_ebnf,
    without_surrogates,
)
from zayaserve.replicas.engine.regex_dialect import regex_ebnf
from zayaserve.replicas.validation_errors import ParamError

# A vocabulary of every byte (RAW) plus a few whole characters: probes walk bytes one by one.
BYTES = [bytes([b]) for b in range(256)]
CHARS = ["\u00a0", "\u2003", "\u0663", "\u00e9", "\u3000", "\u2014", "\U0001f600"]
VOCAB: list[bytes | str] = [*BYTES, *CHARS]
STOP = len(VOCAB)


@pytest.fixture(scope="module")
def compiler() -> Any:
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, vocab_size=STOP + 1,
                             stop_token_ids=[STOP])
    return xgr.GrammarCompiler(info, cache_enabled=False)


def accepts(compiled: Any, data: bytes) -> bool:
    """Whether the grammar takes these bytes, one token a byte, and may end there."""
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(b) for b in data) and matcher.is_completed()


@pytest.mark.parametrize("name", sorted(_SCHEMAS))
@pytest.mark.parametrize("compact", [False, True])
def test_schema_grammars_have_no_defects(name: str, compact: bool) -> None:
    options = {"any_whitespace": False} if compact else {"max_whitespace_cnt": 4}
    ebnf = json_schema_ebnf(xgr, json.dumps(_SCHEMAS[name]), **options)
    assert grammar_defects(ebnf) == []


def test_the_defect_check_finds_xgrammars_own_string_rules() -> None:
    schema = json.dumps(_SCHEMAS["json-maxLength"])
    raw = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    assert any("[^\\\"\\\\\\r\\n]" in line for line in grammar_defects(raw)), raw
    assert grammar_defects(without_surrogates(raw)), "control characters are still let in"


UNSAFE_INSIDE_STRINGS = [b"\x01", b"\t", b"\n", b"\x1f", b'"x', b"\\q"]
NOT_UTF8 = [b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\x80"]


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 8}, {"type": "string", "minLength": 1},
    {"type": "string"}, {"type": "string", "pattern": "^a.{0,3}b$"},
    {"type": "object", "additionalProperties": {"type": "integer"}},
])
def test_json_strings_refuse_raw_controls_and_broken_utf8(compiler: Any,
                                                          schema: dict[str, Any]) -> None:
    compiled = compiler.compile_grammar(json_schema_ebnf(xgr, json.dumps(schema),
                                                         any_whitespace=False))
    wrap = (lambda s: b'{"' + s + b'": 1}') if schema["type"] == "object" else (
        lambda s: b'"a' + s + b'b"')
    for bad in UNSAFE_INSIDE_STRINGS + NOT_UTF8:
        assert not accepts(compiled, wrap(bad)), (schema, bad)
    good = wrap(b"\\u0041\xc3\xa9") if "pattern" not in schema else b'"a\xc3\xa9b"'
    assert accepts(compiled, good), (schema, good)


def test_pattern_literals_are_escaped_in_the_json_text(compiler: Any) -> None:
    schema = {"type": "string", "pattern": '^"[^a-z]\\\\\\n$'}  # quote, non-lower, \, newline
    compiled = compiler.compile_grammar(json_schema_ebnf(xgr, json.dumps(schema),
                                                         any_whitespace=False))
    assert accepts(compiled, b'"\\u0022X\\u005c\\u000a"')
    assert json.loads('"\\u0022X\\u005c\\u000a"') == '"X\\\n'
    for raw in (b'""X\\\n"', b'"\\"X\\\\\\n"', b'"\\u0022"\\u005c\\u000a"'):
        assert not accepts(compiled, raw), raw


def test_formats_are_exact(compiler: Any) -> None:
    schema = {"type": "object", "properties": {
        "d": {"type": "string", "format": "date"}, "ip": {"type": "string", "format": "ipv4"}},
        "required": ["d", "ip"]}
    compiled = compiler.compile_grammar(json_schema_ebnf(xgr, json.dumps(schema),
                                                         any_whitespace=False))
    ok = b'{"d": "2024-02-29", "ip": "10.0.255.1"}'
    assert accepts(compiled, ok)
    for bad in (b'{"d": "2023-02-29", "ip": "10.0.255.1"}', b'{"d": "2024-04-31", "ip": "1.1.1.1"}',
                b'{"d": "0000-01-01", "ip": "1.1.1.1"}', b'{"d": "2024-01-01", "ip": "1.01.1.1"}',
                b'{"d": "2024-01-01", "ip": "256.1.1.1"}'):
        assert not accepts(compiled, bad), bad


# Each with one text the grammar must accept (so the probes below cannot pass vacuously).
REGEXES = {r"\S": "a", r"\W": "-", r"\D": "a", r"\s": " ", r"\w+": "ab", r"\d": "5",
           r".": "a", r"a.b": "a b", r"[.]": ".", r"[^\]\S]x": " x", r"\\.": "\\a",
           r"[\s\S]": "\n", r"(a|.)+": "ab", r"[^\w.-]+": "!?", r"[\W]": "-", r"[^\W]": "a",
           r"x*?y{2,}": "xyy", r"^(ab|c)$": "ab", r"[A-Z]{2}-\d{2,4}": "AB-123",
           r"(?:a|b)c": "bc", r'"[\^\[\]-]"': '"^"', r"(|a)b": "ab"}
PROBES = [chr(i) for i in range(0x20)] + ["\x7f", "a", " ", ".", "]", "\\", '"', "[", "^", "5",
                                           "Z", "_", "-", *CHARS]


@pytest.mark.parametrize("pattern", sorted(REGEXES))
def test_what_a_regex_grammar_accepts_python_accepts(compiler: Any, pattern: str) -> None:
    compiled = compiler.compile_grammar(f"root ::= {regex_ebnf(pattern)}")
    assert re.fullmatch(pattern, REGEXES[pattern])
    assert accepts(compiled, REGEXES[pattern].encode()), REGEXES[pattern]
    for ch in PROBES:
        for text in (ch, f"a{ch}b", ch + ch, f"{ch}x", f"x{ch}yy", "yy", "ab", "cc", "xyy"):
            data = text.encode()
            if accepts(compiled, data):
                assert re.fullmatch(pattern, text), (pattern, text)
    for bad in NOT_UTF8:
        assert not accepts(compiled, b"a" + bad + b"b"), (pattern, bad)


@pytest.mark.parametrize(("pattern", "why"), [
    (r"(a)\1", "backreference"), (r"a(?=b)", "lookahead"), (r"(?i)a", "inline flags"),
    (r"a\bb", "anchor"), (r"a$b", "anchor"), (r"a(", "not a valid regular expression")])
def test_regexes_that_cannot_be_grammars_are_refused(pattern: str, why: str,
                                                     tiny_checkpoint: Any) -> None:
    with pytest.raises(ValueError, match=why):
        regex_ebnf(pattern)
    from zayaserve.replicas.engine.grammar import Grammars
    from zayaserve.replicas.engine.structured import StructuredOutputsParams
    from zayaserve.replicas.model.tokenizer import Tokenizer

    grammars = Grammars(Tokenizer.from_pretrained(tiny_checkpoint), 512, [3])
    with pytest.raises(ParamError) as err:
        grammars.check(StructuredOutputsParams(regex=pattern))
    assert err.value.param == "structured_outputs.regex" and why in str(err.value)
