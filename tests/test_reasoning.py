"""The `<think>` reasoning parser: the thinking lands in `reasoning_content` (whole messages and
stream deltas, the same text either way), `chat_template_kwargs.enable_thinking: false` turns
thinking off per request, `include_reasoning: false` drops it; tags split over stream deltas are
found. Over the real `openai` client, on the tiny model with a template that opens `<think>`."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai_helpers import MODEL, Server, make_engine_client

from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.cluster.frontend.reasoning import ThinkParser, split_reasoning
from zayaserve.replicas.model.checkpoint_paths import resolve_model

THINKING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")
SAMPLES = [("<think>plan it</think>\n\nthe answer", False), ("a b</think>c", True),
           ("no tags at all", False), ("thinking until the end", True),
           ("answer with <think>inside</think> later", False), ("</think>", True),
           ("<think>open only", False), ("x <thi", False)]


@pytest.mark.parametrize(("text", "prompt_thinking"), SAMPLES)
def test_streamed_split_equals_whole(text: str, prompt_thinking: bool) -> None:
    whole = split_reasoning(text, prompt_thinking)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 4))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        parser = ThinkParser(thinking=prompt_thinking, started=prompt_thinking)
        outs = [parser.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        reasoning = "".join(r for r, _ in outs)
        content = "".join(c for _, c in outs)
        assert (reasoning or None, content or None) == (whole[0] or None, whole[1]), pieces
    assert split_reasoning("<think>plan</think>\n\nok", False) == ("plan", "ok")
    assert split_reasoning("mid <think>x</think>", False) == (None, "mid <think>x</think>")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    path = tmp_path_factory.mktemp("thinking") / "tiny"
    shutil.copytree(resolve_model("tiny"), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    client = make_engine_client(str(path))
    parsed = Server(build_openai_app(client, reasoning_parser="think"))
    raw = Server(build_openai_app(client))
    yield parsed.url, raw.url
    parsed.stop()
    raw.stop()
    client.engine.shutdown()


def _chat(url: str, stream: bool = False, **extra: Any) -> Any:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "why?"}], max_completion_tokens=12,
        temperature=0, stream=stream, extra_body={"ignore_eos": True, **extra})


def test_reasoning_content_over_the_api(servers: tuple[str, str]) -> None:
    parsed, raw = servers
    text = _chat(raw).choices[0].message.content  # what the model wrote after <think>
    message = _chat(parsed).choices[0].message
    assert text and "</think>" not in text
    assert message.reasoning_content == text and message.content is None
    chunks = list(_chat(parsed, stream=True))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                       for c in chunks if c.choices)
    assert streamed == text
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    off = _chat(parsed, chat_template_kwargs={"enable_thinking": False}).choices[0].message
    no_think = _chat(raw, chat_template_kwargs={"enable_thinking": False})
    assert off.reasoning_content is None and off.content == no_think.choices[0].message.content
    dropped = _chat(parsed, include_reasoning=False).choices[0].message
    assert dropped.reasoning_content is None and dropped.content is None
