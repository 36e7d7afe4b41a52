"""The streaming detokenizer: its deltas join to the full decode, never split a character."""

from __future__ import annotations

import random

import pytest
from tokenizer_helpers import TEXTS

from zayaserve.replicas.model.builtin.tokenizer_train import (
    END_OF_TURN,
)
from zayaserve.replicas.model.tokenizer import IncrementalDetokenizer, Tokenizer


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], **kw: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [detok.add(i) for i in ids]
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_full_decode(tiny: Tokenizer, small: Tokenizer, text: str) -> None:
    for tok in (tiny, small):
        prompt = tok.encode("A prompt: ")
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, prompt, ids)
        assert "".join(deltas) == tok.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)


def test_multibyte_chars_are_split_across_tokens(tiny: Tokenizer) -> None:
    # With only ~250 merges most of these characters need several byte tokens, so the
    # detokenizer must hold back partial characters.
    text = "🙂🚀👍🏽日本語"
    ids = tiny.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)
    assert any("\ufffd" in tiny.decode([i]) for i in ids)
    deltas = _stream(tiny, [], ids)
    assert "".join(deltas) == text
    assert "" in deltas and not any("\ufffd" in d for d in deltas)


def test_stream_skips_special_tokens(tiny: Tokenizer) -> None:
    eot = tiny.token_to_id(END_OF_TURN)
    assert eot is not None
    ids = [*tiny.encode("héllo", add_special_tokens=False), eot]
    assert "".join(_stream(tiny, [2], ids)) == "héllo"
    kept = "".join(_stream(tiny, [2], ids, skip_special_tokens=False))
    assert kept == "héllo<end_of_turn>"


def test_stream_of_random_ids_matches_decode(small: Tokenizer) -> None:
    # Random ids (as a random-weight model samples) include invalid byte sequences; flush()
    # releases whatever was held back at the end.
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(small.vocab_size) for _ in range(rng.randint(1, 60))]
        detok = IncrementalDetokenizer(small, [])
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        assert text == detok.text == small.decode(ids)


def test_long_stream_keeps_window_small(tiny: Tokenizer) -> None:
    text = "Streaming 🙂 text, über and 日本. " * 50
    ids = tiny.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny, list(range(100)))
    assert "".join(detok.add(i) for i in ids) == text
    assert len(detok._ids) < 2 * IncrementalDetokenizer._TRIM_AT
