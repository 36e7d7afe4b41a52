"""The Hermes tool-call parser on streams: the same calls and content as on the whole text
however it is cut into deltas (one character at a time, random chunks, tags split over
deltas); a possible partial tag is held back until the parser knows, and flushed at the end;
the work per feed stays linear."""

from __future__ import annotations

import json
import random

import pytest
from tool_parser_cases import ID, SAMPLES, named, parse

from zayaserve.cluster.frontend.tool_parsers import CLOSE, OPEN, HermesToolParser, ToolCallDelta


def run_stream(pieces: list[str], last_final: bool = False) -> tuple[str, list[ToolCallDelta]]:
    """Feed the pieces (the last one with final=True, or then an empty final feed)."""
    parser = HermesToolParser().stream()
    content: list[str] = []
    deltas: list[ToolCallDelta] = []
    for i, piece in enumerate(pieces):
        out, new = parser.feed(piece, final=last_final and i == len(pieces) - 1)
        content.append(out)
        deltas.extend(new)
    if not last_final:
        out, new = parser.feed("", final=True)
        content.append(out)
        deltas.extend(new)
    assert parser.called == bool(deltas)
    return "".join(content), deltas


def assemble(deltas: list[ToolCallDelta]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call index, as an OpenAI client would rebuild them."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id is not None and d.name is not None
            calls[d.index] = [d.id, d.name, ""]
        else:
            assert d.id is None and d.name is None
        calls[d.index][2] += d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [(calls[k][0], calls[k][1], calls[k][2]) for k in sorted(calls)]


def check_stream(text: str, pieces: list[str], last_final: bool = False) -> None:
    assert "".join(pieces) == text
    content, deltas = run_stream(pieces, last_final)
    whole_content, whole_calls = parse(text)
    calls = assemble(deltas)
    assert [(n, json.loads(a)) for _, n, a in calls] == named(whole_calls)
    assert [a for _, _, a in calls] == [c.arguments for c in whole_calls]
    assert all(ID.fullmatch(i) for i, _, _ in calls)
    assert len({i for i, _, _ in calls}) == len(calls)
    if whole_calls:
        assert (content.strip() or None) == whole_content
    else:
        assert content == text


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("last_final", [False, True])
def test_stream_one_char_at_a_time(text: str, last_final: bool) -> None:
    check_stream(text, list(text), last_final)


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_random_chunks(text: str) -> None:
    rng = random.Random(f"chunks {text}")
    for trial in range(40):
        n_cuts = rng.randint(0, min(len(text) - 1, 8))
        cuts = sorted(rng.sample(range(1, len(text)), n_cuts))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        check_stream(text, pieces, last_final=trial % 2 == 1)


def test_samples_cover_calls_and_no_calls() -> None:
    with_calls = [t for t in SAMPLES if parse(t)[1]]
    assert 0 < len(with_calls) < len(SAMPLES)


def test_tag_split_across_feeds() -> None:
    parser = HermesToolParser().stream()
    assert parser.feed("a <tool_") == ("a ", [])
    assert parser.feed('call>{"name": "f", "arguments": {"x": 1}}</tool') == ("", [])
    assert not parser.called
    content, deltas = parser.feed("_call>\n")
    assert content == ""
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "f", '{"x": 1}')]
    assert parser.called
    content, deltas = parser.feed('<tool_call>{"name": "g"}</tool_call>', final=True)
    assert (content, [(d.index, d.name, d.arguments) for d in deltas]) == ("", [(1, "g", "{}")])


def test_partial_tag_that_is_not_one_flows_on() -> None:
    parser = HermesToolParser().stream()
    assert parser.feed("x <tool") == ("x ", [])
    assert parser.feed("box") == ("<toolbox", [])


def test_final_flushes_held_partial_tag() -> None:
    parser = HermesToolParser().stream()
    assert parser.feed("a <tool", final=True) == ("a <tool", [])
    parser = HermesToolParser().stream()
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("", final=True) == ("<tool", [])
    assert not parser.called


@pytest.mark.parametrize("tail", ["", "\n", "\n</tool_c"])
def test_unclosed_final_block_with_valid_json_is_a_call(tail: str) -> None:
    parser = HermesToolParser().stream()
    assert parser.feed('ok <tool_call>\n{"name": "f", "arguments": {"a": [1]}}' + tail) == (
        "ok ", [])
    content, deltas = parser.feed("", final=True)
    assert content == ""
    assert [(d.index, d.name, json.loads(d.arguments)) for d in deltas] == [(0, "f", {"a": [1]})]
    assert parser.called


def test_unclosed_final_block_with_bad_json_is_content() -> None:
    parser = HermesToolParser().stream()
    assert parser.feed('<tool_call>{"name": "f", "argu', final=True) == (
        '<tool_call>{"name": "f", "argu', [])
    parser = HermesToolParser().stream()
    assert parser.feed("x <tool_call>") == ("x ", [])
    assert parser.feed("", final=True) == ("<tool_call>", [])


def test_invalid_block_in_stream_is_content() -> None:
    parser = HermesToolParser().stream()
    content, deltas = parser.feed('<tool_call>{"name": "f"}</tool_call>\n'
                                  '<tool_call>[1]</tool_call> tail', final=True)
    assert content == "<tool_call>[1]</tool_call> tail"
    assert [d.name for d in deltas] == ["f"]


def test_whitespace_after_a_call_is_held_then_dropped_or_sent() -> None:
    parser = HermesToolParser().stream()
    assert parser.feed('<tool_call>{"name": "f"}</tool_call>\n\n')[0] == ""
    assert parser.feed("Done")[0] == "\n\nDone"
    parser = HermesToolParser().stream()
    assert parser.feed('<tool_call>{"name": "f"}</tool_call>\n\n')[0] == ""
    assert parser.feed("", final=True) == ("", [])


# Each feed may look at its own text plus what could end a tag held from before: linear work.
PER_FEED = len(CLOSE)


def test_an_unclosed_block_fed_a_char_at_a_time_is_linear_work() -> None:
    n = 200_000
    parser = HermesToolParser().stream()
    assert parser.feed("ok " + OPEN) == ("ok ", [])
    for _ in range(n):
        assert parser.feed("x") == ("", [])
    assert parser.scanned <= PER_FEED * (n + 1)  # a rescan per feed would be ~n * n / 2
    assert parser.feed("", final=True) == (OPEN + "x" * n, [])


def test_a_long_call_and_the_whitespace_after_it_are_linear_work() -> None:
    n = 100_000
    text = '<tool_call>{"name": "f", "arguments": {"s": "' + "y" * n + '"}}</tool_call>'
    parser = HermesToolParser().stream()
    deltas = [d for ch in text for d in parser.feed(ch)[1]]
    assert [(d.name, len(d.arguments)) for d in deltas] == [("f", n + 9)]
    assert all(parser.feed(" ") == ("", []) for _ in range(n))  # held: a call may follow
    assert parser.feed("Done") == (" " * n + "Done", [])
    assert parser.scanned <= PER_FEED * (len(text) + n + 1)
