"""`tool_choice: "required"` keeps its promise under random inputs: over REST with the real
`openai` client, 32 seeded calls at temperature 1 (one tool whose string argument has a
`maxLength`, `parallel_tool_calls: false`) all come back as one parsed call in `tool_calls`,
valid against the tool's schema, with `finish_reason: "tool_calls"`. (With xgrammar's own
length-bounded strings, raw control characters once made some of these `stop` with the call
left as unparseable content.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import xgrammar  # noqa: F401  (the `structured` extra: tests/run.sh installs it)
from openai_helpers import MODEL
from test_openai_structured import client, engine_client  # noqa: F401  (module fixtures)

CALLS = 32
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_every_seeded_required_call_parses_and_follows_its_schema(
        client: openai.OpenAI, stream: bool) -> None:  # noqa: F811
    made = 0
    for seed in range(CALLS):
        kw: dict[str, Any] = dict(model=MODEL, messages=USER, tools=TOOLS,
                                  tool_choice="required", parallel_tool_calls=False,
                                  temperature=1.0, seed=seed, max_completion_tokens=400)
        if stream:
            calls: dict[int, dict[str, str]] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    assert not ch.delta.content, (seed, ch.delta.content)
                    for t in ch.delta.tool_calls or []:
                        call = calls.setdefault(t.index, {"name": "", "arguments": ""})
                        call["name"] += t.function.name or ""
                        call["arguments"] += t.function.arguments or ""
                    finish = ch.finish_reason or finish
            made_calls = list(calls.values())
        else:
            choice = client.chat.completions.create(**kw).choices[0]
            assert choice.message.content is None, (seed, choice.message.content)
            finish = choice.finish_reason
            made_calls = [{"name": t.function.name, "arguments": t.function.arguments}
                          for t in choice.message.tool_calls or []]
        assert finish == "tool_calls", (seed, finish, made_calls)
        assert [c["name"] for c in made_calls] == ["get_weather"], (seed, made_calls)
        jsonschema.validate(json.loads(made_calls[0]["arguments"]), WEATHER)
        made += 1
    print(f"\n[tool_choice required] stream={stream}: {made}/{CALLS} seeded calls parsed and "
          "valid")
    assert made == CALLS
