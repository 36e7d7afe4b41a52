"""Texts a Hermes-style model may write, and helpers the tool-parser tests share."""

from __future__ import annotations

import json
import re

from zayaserve.cluster.frontend.tool_parsers import HermesToolParser, ParsedToolCall

ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")
SAMPLE = ('some optional content text\n<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>\n')
SAMPLES = [
    SAMPLE,
    '<tool_call>{"name":"a","arguments":"{\\"k\\": [1, 2]}"}</tool_call>'
    '<tool_call>{"name":"b"}</tool_call>',
    'compare a<b and <tool maybe\n<tool_call>{"name": "g", "arguments": '
    '{"s": "</tool <tool_call", "n": {"m": [1.5, null, true]}}}</tool_call>',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>\nDone.',
    'x<tool_call>{"name": "a"}</tool_call> then <tool_call>'
    '{"name": "b", "arguments": {"s": "naïve ☃"}}</tool_call>  \n',
    '<tool_call>{"name": "a"}</tool_call>\n<tool',
    "plain answer < with <tool but no call",
    'oops <tool_call>{"name": 3}</tool_call> end',
    "stopped <tool_call>",
]


def parse(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    return HermesToolParser().parse(text)


def named(calls: list[ParsedToolCall]) -> list[tuple[str, object]]:
    """The calls' names and decoded arguments, in order."""
    return [(c.name, json.loads(c.arguments)) for c in calls]
