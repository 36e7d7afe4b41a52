"""xgrammar's view of the vocabulary (`grammar_vocab.tokenizer_info`) against what the engine's
IncrementalDetokenizer writes, for the tokenizer kinds of tests/tokenizer_kinds.py: byte-level
BPE (built-in), Gemma-style byte-fallback BPE (ZAYA1's layout) and byte-level BPE with control
tokens inside the vocab. A constrained output obeys its grammar byte for byte as the client
decodes it only if, token for token, the two agree."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import xgrammar as xgr  # (the `structured` extra: tests/run.sh installs it)
from tokenizer_kinds import (
    CONTROL_TOKENS,
    KINDS,
    PLAIN_ADDED_TOKEN,
    UNK_TOKEN,
    load,
    preset_ids,
    write_checkpoint,
)

from zayaserve.replicas.engine.grammar_vocab import tokenizer_info
from zayaserve.replicas.model.tokenizer import IncrementalDetokenizer, Tokenizer

PROMPT = "The answer is"
VOCAB = preset_ids("tiny")["vocab_size"]
# Characters to spell byte by byte: 1- to 4-byte UTF-8, inside and outside the learned pieces.
CHARS = ["a", "~", "é", "ß", "ж", "م", "日", "語", "こ", "€", "🙂", "🚀", "\U0001f9ea"]
TEXTS = ["Hello café 日本語 東京, привет 🙂 naïve!", "  two  spaces\nand\ttabs ", "{\"k\": [1, 2]}",
         "über straße niño こんにちは 👍🏽 ❤️ 🎉🎉", "x"]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's bytes-to-unicode table: the byte-level BPE spelling of each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def byte_token_ids(kind: str, tok: Tokenizer) -> dict[int, int]:
    """The id of the token that is exactly one byte, for each byte."""
    spell = (lambda b: f"<0x{b:02X}>") if kind == "gemma" else _byte_to_unicode().__getitem__
    ids = {b: tok.token_to_id(spell(b)) for b in range(256)}
    assert all(i is not None for i in ids.values())
    return {b: int(i) for b, i in ids.items() if i is not None}


def detokenize(tok: Tokenizer, ids: Sequence[int]) -> str:
    """What the client reads: the detokenizer's deltas after a prompt, flushed at the end."""
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    return "".join(detok.add(i) for i in ids) + detok.flush()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def allowed(matcher: Any, vocab_size: int) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    bits = (bitmask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.flatten()[:vocab_size]).flatten().tolist())


def normal_ids(tok: Tokenizer, vocab_size: int) -> list[int]:
    special = set(tok.all_special_ids)
    return [i for i in range(vocab_size) if i not in special]


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tok(kind: str) -> Tokenizer:
    return load(kind)


@pytest.fixture(scope="module")
def info(tok: Tokenizer) -> Any:
    return tokenizer_info(xgr, tok, VOCAB, tok.eos_token_ids)


def test_checkpoint_of_each_kind_loads_with_the_config_layout(kind: str, tmp_path: Path) -> None:
    from zayaserve import LLM, SamplingParams

    path = write_checkpoint(tmp_path / kind, kind)
    tok = Tokenizer.from_pretrained(path)
    ids = preset_ids("tiny")
    assert tok.vocab_size == ids["vocab_size"] == VOCAB
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (
        ids["pad"], ids["bos"], [ids["eos"]])
    assert [tok.id_to_token(ids[k]) for k in ("pad", "bos", "eos")] == [
        "<pad>", "<bos>", "<end_of_turn>"]
    assert "<start_of_turn>" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    pieces = tok.hf.encode("日本語 東京 привет 🙂").tokens
    if kind == "gemma":
        assert all(tok.token_to_id(f"<0x{b:02X}>") is not None for b in range(256))
        assert tok.token_to_id(UNK_TOKEN) in tok.all_special_ids
        assert "<0xD0>" in pieces and "<0xF0>" in pieces  # Cyrillic, emoji: byte fallback
        assert any(len(p) > 1 and ord(p[-1]) > 0x3000 for p in pieces)  # merged CJK pieces
    if kind == "special":
        control = [tok.token_to_id(t) for t in CONTROL_TOKENS]
        assert all(c is not None and c < VOCAB - 1 for c in control)
        assert set(control) <= set(tok.all_special_ids)
        assert tok.encode("<think>x</think>", add_special_tokens=False)[::2] == control[2:4]
        assert tok.token_to_id(PLAIN_ADDED_TOKEN) == VOCAB - 1
        assert VOCAB - 1 not in tok.all_special_ids
    out = LLM(model=str(path)).generate(["hello"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_every_token_adds_exactly_the_bytes_the_detokenizer_writes(tok: Tokenizer,
                                                                   info: Any) -> None:
    vocab = info.decoded_vocab
    partial = 0
    for i in normal_ids(tok, VOCAB):
        text = detokenize(tok, [i])
        if "\ufffd" in text:  # part of a character: held back, then flushed lossily
            partial += 1
            assert not is_utf8(vocab[i]) and vocab[i].decode("utf-8", "replace") == text, i
        else:
            assert vocab[i] == text.encode("utf-8"), (i, tok.id_to_token(i))
    assert partial >= 128  # at least the lone bytes 0x80..0xFF


def test_random_sequences_decode_to_the_concatenated_bytes(kind: str, tok: Tokenizer,
                                                           info: Any) -> None:
    vocab = info.decoded_vocab
    rng = random.Random(1234)
    normal = normal_ids(tok, VOCAB)
    byte_ids = byte_token_ids(kind, tok)
    clean = spelled = 0
    for _ in range(600):
        ids: list[int] = []
        multibyte = False
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.45:
                ids.append(rng.choice(normal))
            elif r < 0.75:  # a whole character, byte piece by byte piece
                char = rng.choice(CHARS)
                multibyte |= len(char.encode()) > 1
                ids += [byte_ids[b] for b in char.encode()]
            elif r < 0.79:  # a stray byte: often not UTF-8 where it lands
                ids.append(byte_ids[rng.randrange(256)])
            else:
                ids += tok.encode(rng.choice(TEXTS), add_special_tokens=False)[:6]
        text = detokenize(tok, ids)
        joined = b"".join(vocab[i] for i in ids)
        # The client sees U+FFFD exactly where xgrammar's bytes are not UTF-8; otherwise both
        # see the same bytes.
        assert ("\ufffd" in text) == (not is_utf8(joined)), (ids, text, joined)
        if "\ufffd" not in text:
            assert joined == text.encode("utf-8"), (ids, text, joined)
            clean += 1
            spelled += multibyte
    assert clean >= 150 and spelled >= 80, (clean, spelled)


def test_encoded_text_has_the_same_bytes_in_both_views(tok: Tokenizer, info: Any) -> None:
    vocab = info.decoded_vocab
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert detokenize(tok, ids) == text
        assert b"".join(vocab[i] for i in ids) == text.encode("utf-8")


def test_special_tokens_are_masked_and_only_stop_tokens_end(tok: Tokenizer, info: Any) -> None:
    stops = set(tok.eos_token_ids)
    assert set(info.stop_token_ids) == stops
    assert set(info.special_token_ids) == set(tok.all_special_ids) - stops
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    matcher = xgr.GrammarMatcher(compiler.compile_regex("[a-z ]+"))
    first = allowed(matcher, VOCAB)
    assert first and not first & set(tok.all_special_ids)
    vocab = info.decoded_vocab
    assert all(re.fullmatch(rb"[a-z ]+", vocab[i]) for i in first)
    assert matcher.accept_token(tok.token_to_id("a"))
    after = allowed(matcher, VOCAB)
    assert stops <= after and not after & set(info.special_token_ids)
    # A grammar that spells the special tokens' text gets it from plain tokens, never from the
    # control tokens, which the client would not see.
    texts = [str(tok.id_to_token(i)) for i in tok.all_special_ids]
    spelled = xgr.GrammarMatcher(compiler.compile_regex("|".join(map(re.escape, texts))))
    first = allowed(spelled, VOCAB)
    assert first and not first & set(tok.all_special_ids)


def test_byte_pieces_never_make_invalid_utf8(kind: str, tok: Tokenizer, info: Any) -> None:
    vocab = info.decoded_vocab
    byte_ids = byte_token_ids(kind, tok)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info, max_threads=1)
                                 .compile_grammar('root ::= [^"]*'))
    starts = allowed(matcher, VOCAB) - set(tok.eos_token_ids)
    # Each allowed token starts a character: ASCII or a valid lead byte, never a continuation.
    assert all(vocab[i][0] < 0x80 or 0xC2 <= vocab[i][0] <= 0xF4 for i in starts)
    assert {byte_ids[b] for b in (0xC3, 0xE6, 0xF0)} <= starts
    assert not {byte_ids[b] for b in (0x80, 0xBF, 0xC0, 0xC1, 0xF5, 0xFF)} & starts
    spelled = [byte_ids[b] for b in "日".encode()]
    for k, token in enumerate(spelled):
        assert matcher.accept_token(token)
        following = allowed(matcher, VOCAB)
        if k < len(spelled) - 1:  # mid-character: continuation bytes only, no stop
            assert following and all(0x80 <= vocab[i][0] <= 0xBF for i in following)
            assert not following & set(tok.eos_token_ids)
    assert byte_ids[ord("a")] in following and set(tok.eos_token_ids) <= following
    assert detokenize(tok, spelled) == "日"


def test_from_huggingface_reads_special_tokens_as_text(kind: str, tok: Tokenizer,
                                                       info: Any) -> None:
    """The previous construction, `from_huggingface` as grammar.py does it, detects the vocab
    type right for all three kinds (BYTE_LEVEL, BYTE_FALLBACK for gemma, no prefix space) and
    so gets every plain token right, but it knows no special token: it decodes `<pad>`,
    `<start_of_turn>`, `<bos>` (and `<unk>` for gemma, and `<tool_call>`, `</tool_call>`,
    `<think>`, `</think>`, `<|im_start|>` for special) as their text, so a grammar whose
    language has that text lets the model emit the control token, and the client, whose
    detokenizer skips it, reads nothing there. All three kinds are affected."""
    from transformers import PreTrainedTokenizerFast

    old = xgr.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=tok.hf), vocab_size=VOCAB,
        stop_token_ids=tok.eos_token_ids)
    assert old.vocab_type == (xgr.VocabType.BYTE_FALLBACK if kind == "gemma"
                              else xgr.VocabType.BYTE_LEVEL)
    assert old.special_token_ids == []
    masked = set(tok.all_special_ids) - set(tok.eos_token_ids)
    old_vocab, vocab = old.decoded_vocab, info.decoded_vocab  # each read copies the vocab
    differ = {i for i in range(VOCAB) if old_vocab[i] != vocab[i]}
    assert differ - set(tok.eos_token_ids) == masked
    assert all(old_vocab[i] == str(tok.id_to_token(i)).encode() for i in masked)
    regex = "|".join(re.escape(str(tok.id_to_token(i))) for i in sorted(masked))
    old_first = allowed(xgr.GrammarMatcher(xgr.GrammarCompiler(old, max_threads=1)
                                           .compile_regex(regex)), VOCAB)
    assert old_first & masked  # e.g. <bos> allowed where the grammar wants the text "<bos>"


def test_zaya1_sized_gemma_vocab() -> None:
    """ZAYA1's shape: a 262k Gemma-style vocab, eos 106 (<end_of_turn>)."""
    tok = load("gemma", "zaya1-8b")
    size = preset_ids("zaya1-8b")["vocab_size"]
    assert tok.vocab_size == size and tok.eos_token_ids == [106]
    info = tokenizer_info(xgr, tok, size, tok.eos_token_ids)
    assert set(info.special_token_ids) == set(tok.all_special_ids) - {106}
    vocab = info.decoded_vocab
    rng = random.Random(7)
    byte_ids = byte_token_ids("gemma", tok)
    sample = set(rng.sample(normal_ids(tok, size), 1500)) | set(byte_ids.values())
    for i in sorted(sample):
        text = detokenize(tok, [i])
        if "\ufffd" not in text:
            assert vocab[i] == text.encode("utf-8"), i
        else:
            assert not is_utf8(vocab[i]), i
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(vocab[i] for i in ids) == text.encode("utf-8")
