"""The Hermes tool-call parser on whole messages: (content, calls) or, if any block is invalid,
the text unchanged; and the parser registry. Streams: test_tool_parser_stream.py."""

from __future__ import annotations

import json

import pytest
from tool_parser_cases import ID, SAMPLE, named, parse

from zayaserve.cluster.frontend.tool_parsers import (
    TOOL_PARSERS,
    HermesToolParser,
    get_tool_parser,
    register_tool_parser,
)


def test_single_call() -> None:
    content, calls = parse('<tool_call>\n{"name": "f", "arguments": {"city": "Zürich"}}\n'
                           '</tool_call>')
    assert content is None
    assert named(calls) == [("f", {"city": "Zürich"})]
    assert calls[0].arguments == '{"city": "Zürich"}'  # ensure_ascii=False
    assert ID.fullmatch(calls[0].id)


def test_multiple_calls_with_content_before() -> None:
    content, calls = parse(SAMPLE)
    assert content == "some optional content text"
    assert named(calls) == [("get_weather", {"city": "Paris"}), ("other", {})]
    assert all(ID.fullmatch(c.id) for c in calls)
    assert calls[0].id != calls[1].id


def test_ids_are_random() -> None:
    ids = {c.id for _ in range(20) for c in parse(SAMPLE)[1]}
    assert len(ids) == 40


def test_arguments_as_json_string() -> None:
    _, calls = parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, {\\"b\\": null}]}"}'
                     '</tool_call>')
    assert named(calls) == [("f", {"a": [1, {"b": None}]})]


def test_missing_arguments_means_empty_object() -> None:
    _, calls = parse('<tool_call>{"name": "f"}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("f", "{}")]


def test_arguments_round_trip() -> None:
    args = {"q": "é \"quoted\" \\ \n ☃", "n": [1, 2.5, -3e-7, True, None], "o": {"": {}}}
    _, calls = parse(f'<tool_call>{json.dumps({"name": "f", "arguments": args})}</tool_call>')
    assert json.loads(calls[0].arguments) == args


def test_text_after_calls() -> None:
    assert parse('<tool_call>{"name": "f"}</tool_call> \n\t')[0] is None
    assert parse('pre <tool_call>{"name": "f"}</tool_call>\nDone.')[0] == "pre \nDone."


def test_no_tags_is_unchanged() -> None:
    assert parse("  just text </tool_call>\n") == ("  just text </tool_call>\n", [])
    assert parse("") == (None, [])


@pytest.mark.parametrize("block", [
    '{"name": "f", "arguments": {"a": 1}',  # bad JSON
    '{"name": "f"} trailing',
    '["f", {}]',  # not an object
    '{"arguments": {}}',  # no name
    '{"name": 3, "arguments": {}}',
    '{"name": "", "arguments": {}}',
    '{"name": "f", "arguments": [1]}',
    '{"name": "f", "arguments": null}',
    '{"name": "f", "arguments": "[1]"}',  # a string, but not of an object
    '{"name": "f", "arguments": "{bad"}',
    '{"name": "f", "arguments": {"x": NaN}}',  # would not round-trip
])
def test_invalid_block_gives_whole_text(block: str) -> None:
    text = f'hi <tool_call>{{"name": "ok"}}</tool_call>\n<tool_call>{block}</tool_call>'
    assert parse(text) == (text, [])


@pytest.mark.parametrize(("text", "content", "names"), [
    ('a <tool_call>{"name": "f", "arguments": {}}', "a", ["f"]),
    ('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"}', None, ["f", "g"]),
])
def test_an_unclosed_last_block_is_a_call_when_its_json_is(
        text: str, content: str | None, names: list[str]) -> None:
    """Models often stop right after the JSON; a stream takes such a block too."""
    got_content, calls = parse(text)
    assert got_content == content and [c.name for c in calls] == names


@pytest.mark.parametrize("text", ["a <tool_call>", 'a <tool_call>{"name": "f", "argu'])
def test_an_unclosed_block_without_a_call_gives_whole_text(text: str) -> None:
    assert parse(text) == (text, [])


def test_registry() -> None:
    assert isinstance(get_tool_parser("hermes"), HermesToolParser)
    assert TOOL_PARSERS["hermes"] is HermesToolParser
    with pytest.raises(ValueError, match="nope") as err:
        get_tool_parser("nope")
    assert "hermes" in str(err.value)
    register_tool_parser("custom", HermesToolParser)
    try:
        assert isinstance(get_tool_parser("custom"), HermesToolParser)
    finally:
        del TOOL_PARSERS["custom"]
    with pytest.raises(ValueError, match="custom"):
        get_tool_parser("custom")
