"""Token logprobs in OpenAI's two layouts: the legacy one of /v1/completions and the chat one
(each token with its bytes and its top alternatives)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from weakref import WeakKeyDictionary

from zayaserve.cluster.frontend.openai_chat_protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from zayaserve.cluster.frontend.openai_completions_protocol import CompletionLogprobs
from zayaserve.cluster.frontend.openai_protocol import PromptLogprob, PromptLogprobsOut
from zayaserve.replicas.engine.outputs import Logprob
from zayaserve.replicas.model.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes stand for themselves, the rest
    were shifted to code points from 256 up, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


# Each token's text and bytes, decoded once per tokenizer (at most the vocabulary's size): a
# response with top-20 logprobs names the same few thousand tokens over and over.
_TEXTS: WeakKeyDictionary[Tokenizer, dict[int, str]] = WeakKeyDictionary()
_BYTES: WeakKeyDictionary[Tokenizer, dict[int, list[int]]] = WeakKeyDictionary()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    texts = _TEXTS.setdefault(tokenizer, {})
    text = texts.get(token_id)
    if text is None:
        text = texts[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
    return text


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The token's own bytes; a byte-level token may hold part of a UTF-8 character, which its
    decoded text (U+FFFD) would lose. (Callers get the cached list: they must not change it.)"""
    known = _BYTES.setdefault(tokenizer, {})
    found = known.get(token_id)
    if found is None:
        found = known[token_id] = _token_bytes(tokenizer, token_id)
    return found


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    decoder = getattr(tokenizer.hf, "decoder", None)
    piece = tokenizer.id_to_token(token_id)
    if piece is not None and type(decoder).__name__ == "ByteLevel":
        alphabet = _byte_level_alphabet()
        if all(ch in alphabet for ch in piece):
            return [alphabet[ch] for ch in piece]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def _ranked(entries: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entries.items(), key=lambda kv: (-kv[1].logprob, kv[0]))


def completion_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]],
    start_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy layout for these tokens, text offsets counted from start_offset; returns it
    and the offset after the last token. top_logprobs holds the sampled token and the top-k,
    as vLLM's does."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.token_logprobs.append(entries[token_id].logprob if token_id in entries else None)
        out.top_logprobs.append({token_text(tokenizer, t): lp.logprob
                                 for t, lp in _ranked(entries)})
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]],
    top_k: int,
) -> ChatLogprobs:
    """The chat layout: each token with its bytes and exactly top_k alternatives by rank."""
    content = []
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        top = [ChatTopLogprob(token=token_text(tokenizer, t), logprob=lp.logprob,
                              bytes=token_bytes(tokenizer, t))
               for t, lp in _ranked(entries)[:top_k]]
        sampled = entries.get(token_id)
        content.append(ChatTokenLogprob(
            token=token_text(tokenizer, token_id),
            logprob=sampled.logprob if sampled is not None else float("-inf"),
            bytes=token_bytes(tokenizer, token_id), top_logprobs=top))
    return ChatLogprobs(content=content)


def prompt_logprobs_out(tokenizer: Tokenizer, logprobs: Sequence[dict[int, Logprob] | None] | None
                        ) -> PromptLogprobsOut | None:
    """vLLM's `prompt_logprobs` answer: per position, token id -> logprob, rank, text."""
    if logprobs is None:
        return None
    return [None if entries is None else {
        str(t): PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                              decoded_token=token_text(tokenizer, t))
        for t, lp in _ranked(entries)} for entries in logprobs]
