"""Tool-call parsers: find the tool calls in a chat completion's generated text, in whole
messages (`parse`) and in stream deltas (`stream().feed`).

The Hermes format (Qwen3-family templates) writes each call as a JSON object inside tags:

    optional content text
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A whole message is all or nothing: if any call block fails to parse, the message is returned
as plain content with no calls (a call is never invented). A stream cannot take back what it
already sent, so it decides block by block: a valid block becomes one `ToolCallDelta` carrying
the whole arguments text, an invalid one is sent on as content, tags included. For messages
whose blocks are all valid, a stream's calls equal `parse`'s, and its content equals `parse`'s
up to the whitespace around it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from zayaserve.cluster.frontend.reasoning import partial_tag

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call of a whole message."""

    id: str  # "chatcmpl-tool-" + 32 hex digits
    name: str
    arguments: str  # the arguments object as JSON text


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a tool call, in OpenAI's streaming shape."""

    index: int  # position of the call within the message (0, 1, ...)
    id: str | None  # set on the first delta of a call
    name: str | None  # set on the first delta of a call
    arguments: str  # a fragment of the arguments JSON text


class StreamingToolParser(Protocol):
    """Splits one streamed completion into content text and tool-call deltas."""

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Take the next generated text; return (content to emit now, deltas to emit now).
        `final=True` marks the end of the completion: nothing is held back after it."""
        ...

    @property
    def called(self) -> bool:
        """At least one tool call was emitted."""
        ...


class ToolParser(Protocol):
    """Finds tool calls in whole messages and makes parsers for streams."""

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """A whole message as (content or None, tool calls)."""
        ...

    def stream(self) -> StreamingToolParser:
        """A fresh parser for one streamed completion."""
        ...


def new_call_id() -> str:
    """A random tool-call id."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in a tool call")


def _load_object(text: str) -> dict[str, Any] | None:
    """`text` as a JSON object, or None if it is not one (NaN and Infinity are refused:
    they would not survive a round trip)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _parse_block(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one call block's body, or None if it is not a valid call:
    an object with a non-empty string "name" and an "arguments" object (or a JSON string that
    holds one; missing means {})."""
    call = _load_object(block)
    if call is None or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _load_object(arguments)
    if not isinstance(arguments, dict):
        return None
    try:
        return call["name"], json.dumps(arguments, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


class HermesToolParser:
    """Tool calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks."""

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """Content is the text before the first block plus any text between or after blocks
        that is not only whitespace, stripped (None if empty). A message without blocks is
        returned unchanged; one with any invalid block, too, with no calls. The last block may
        be unclosed (a model often stops right after the JSON), as in a stream."""
        at = text.find(OPEN)
        if at == -1:
            return text or None, []
        pieces, calls = [text[:at]], []
        while at != -1:
            end = text.find(CLOSE, at + len(OPEN))
            body = text[at + len(OPEN):] if end == -1 else text[at + len(OPEN):end]
            parsed = _parse_block(body)
            if parsed is None:
                return text, []
            calls.append(ParsedToolCall(new_call_id(), *parsed))
            if end == -1:
                break
            after = end + len(CLOSE)
            at = text.find(OPEN, after)
            between = text[after:] if at == -1 else text[after:at]
            if between.strip():
                pieces.append(between)
        return "".join(pieces).strip() or None, calls

    def stream(self) -> HermesStreamingParser:
        """A fresh parser for one streamed completion."""
        return HermesStreamingParser()


class HermesStreamingParser:
    """The streaming side of `HermesToolParser`.

    Content flows out as it comes, except a suffix that could start `<tool_call>`, held until
    the next feed decides. Inside a block the text is buffered until `</tool_call>`. After a
    call, whitespace is held: dropped if another block (or the end) follows, sent on as
    content with the text after it otherwise.

    Work is linear in the text however it is cut: each feed looks only at its own text plus
    the few held characters that could finish a tag (never the whole buffered block or held
    whitespace again); a block's pieces are joined once, when it ends. `scanned` counts the
    characters the tag searches looked at.
    """

    def __init__(self) -> None:
        self._mode = "content"  # "content", "call" (inside a block) or "after" (a call)
        self._held = ""  # a suffix that may start a tag: shorter than the tag
        self._space: list[str] = []  # whitespace after a call ("after"), not yet sent
        self._block: list[str] = []  # the open block's text so far ("call"), no CLOSE in it
        self._tail = ""  # its last len(CLOSE) - 1 characters
        self._index = 0
        self.scanned = 0

    @property
    def called(self) -> bool:
        """At least one tool call was emitted."""
        return self._index > 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Take the next generated text; return (content to emit now, deltas to emit now)."""
        text, self._held = self._held + text, ""
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while text or (final and self._mode == "call"):  # an empty open block ends, too
            if self._mode == "call":
                text = self._in_call(text, final, content, deltas)
            else:
                text = self._outside(text, final, content)
        if final:
            self._space = []  # whitespace after the last call: dropped
        return "".join(content), deltas

    def _find(self, text: str, tag: str) -> int:
        self.scanned += len(text)
        return text.find(tag)

    def _outside(self, text: str, final: bool, content: list[str]) -> str:
        """Handle text outside a block; return what is left for the block it opens."""
        at = self._find(text, OPEN)
        if at != -1:
            before = text[:at]
            if self._mode == "content" or before.strip():
                content.extend((*self._space, before))
            self._space, self._block, self._tail = [], [], ""
            self._mode = "call"
            return text[at + len(OPEN):]
        keep = 0 if final else partial_tag(text, OPEN)
        body, held = text[:len(text) - keep], text[len(text) - keep:]
        if self._mode == "content" or body.strip():
            content.extend((*self._space, body))
            self._mode, self._held, self._space = "content", held, []
        elif not final:  # whitespace after a call: wait for what follows
            self._space.append(body)
            self._held = held
        return ""

    def _in_call(self, text: str, final: bool, content: list[str],
                 deltas: list[ToolCallDelta]) -> str:
        """Handle text inside a block; return what is left after it closes. The block so far
        holds no CLOSE, so one can only start in its tail."""
        window = self._tail + text
        end = self._find(window, CLOSE)
        if end != -1:
            cut = end - len(self._tail)  # where CLOSE starts in `text` (<= 0: in the tail)
            body = "".join(self._block)
            body = body[:len(body) + cut] if cut < 0 else body + text[:cut]
            self._block, self._tail = [], ""
            self._finish(body, OPEN + body + CLOSE, content, deltas)
            return window[end + len(CLOSE):]
        self._block.append(text)
        self._tail = window[-(len(CLOSE) - 1):]
        if final:  # stopped inside the block: often right after the JSON
            whole = "".join(self._block)
            self._block, self._tail = [], ""
            self._finish(whole[:len(whole) - partial_tag(whole, CLOSE)], OPEN + whole, content,
                         deltas)
        return ""

    def _finish(self, body: str, raw: str, content: list[str],
                deltas: list[ToolCallDelta]) -> None:
        """Emit a block's call, or its raw text as content if it is not a valid call."""
        parsed = _parse_block(body)
        if parsed is None:
            content.append(raw)
            self._mode = "content"
            return
        name, arguments = parsed
        deltas.append(ToolCallDelta(self._index, new_call_id(), name, arguments))
        self._index += 1
        self._mode = "after"


TOOL_PARSERS: dict[str, Callable[[], ToolParser]] = {"hermes": HermesToolParser}


def register_tool_parser(name: str, factory: Callable[[], ToolParser]) -> None:
    """Make `factory` available as `name` (replacing any parser of that name)."""
    TOOL_PARSERS[name] = factory


def get_tool_parser(name: str) -> ToolParser:
    """A new parser of the given name; ValueError naming the known ones if there is none."""
    factory = TOOL_PARSERS.get(name)
    if factory is None:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool parser {name!r}; known parsers: {known}")
    return factory()
