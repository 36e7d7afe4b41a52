"""Chat templates: rendering turns, matching transformers, refusing bad messages, sandboxed."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_helpers import TEXTS, _write

from zayaserve.replicas.model.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": [{"type": "text", "text": "日本"}, {"type": "text", "text": "?"}]},
]


def test_chat_template_renders_turns(tiny: Tokenizer) -> None:
    text = tiny.apply_chat_template(CONVERSATION)
    assert text == (
        "<bos>"
        "<start_of_turn>system\nBe brief.<end_of_turn>\n"
        "<start_of_turn>user\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n日本\n?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = tiny.encode(text, add_special_tokens=False)
    assert ids[0] == tiny.bos_token_id and ids.count(tiny.bos_token_id) == 1  # type: ignore[arg-type]
    assert tiny.decode(ids, skip_special_tokens=False) == text


def test_chat_template_without_generation_prompt(tiny: Tokenizer) -> None:
    text = tiny.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False)
    assert text.endswith("<start_of_turn>user\nHi there<end_of_turn>\n")
    assert "<start_of_turn>model" not in text


def test_chat_template_matches_transformers(tmp_path: Path) -> None:
    import transformers
    path = _write(tmp_path)
    ours = Tokenizer.from_pretrained(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    messages = CONVERSATION[:3]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"]


@pytest.mark.parametrize(
    "messages, field",
    [
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], r"messages\[0\]\.content\[0\]"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"content\[0\]\.text"),
        (["hello"], r"messages\[0\]"),
    ],
)
def test_bad_messages(tiny: Tokenizer, messages: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny.apply_chat_template(messages)


def test_unknown_role_raises_from_template(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unsupported role: robot"):
        tiny.apply_chat_template([{"role": "robot", "content": "x"}])


def test_extra_template_variables(tiny: Tokenizer) -> None:
    tiny_copy = Tokenizer(tiny.hf, chat_template="{{ greeting }} {{ messages | length }}")
    assert tiny_copy.apply_chat_template([], greeting="hey") == "hey 0"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_template_is_sandboxed(tiny: Tokenizer, template: str) -> None:
    tok = Tokenizer(tiny.hf, chat_template=template)
    try:
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except ValueError as e:  # a SecurityError or UndefinedError, wrapped
        assert "chat template" in str(e)
    else:
        assert "class" not in rendered and "builtins" not in rendered


def test_template_security_error_is_chained(tiny: Tokenizer) -> None:
    from jinja2.exceptions import SecurityError

    tok = Tokenizer(tiny.hf, chat_template="{{ messages.append(1) }}")
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(info.value.__cause__, SecurityError)


# --- incremental detokenizer -----------------------------------------------------------------
