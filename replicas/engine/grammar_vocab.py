"""xgrammar's view of the vocabulary, token for token what the engine's detokenizer writes.

A constrained output must obey its grammar byte for byte as the client reads it, and the client
reads what `IncrementalDetokenizer` makes of the ids: `tokenizers` decoding with special tokens
skipped. So the bytes xgrammar believes a token adds must be the bytes that decoding adds for it
mid-sequence. `TokenizerInfo.from_huggingface` instead guesses a vocab type from tokenizer.json
and decodes each token string itself: it reads special tokens (`<bos>`, `<tool_call>`...) as
their literal text, so a grammar whose language contains that text lets the model emit the
control token, which the client never sees.

Here each token's bytes come from the tokenizer's own decoder, after a little left context (as
the detokenizer decodes). A token that does not decode to whole characters on its own (a
`<0xE6>` byte piece, a byte-level piece ending inside a character) decodes with U+FFFD: its raw
bytes are worked out from the token string by the decoder chain (ByteLevel, ByteFallback,
Replace, Fuse...) and kept only if decoding them reproduces what the tokenizer wrote. The vocab
goes to xgrammar as RAW bytes. Tokens the detokenizer skips, and any whose bytes cannot be
pinned down, get b"": xgrammar takes an empty token for a special one, which no grammar allows
(stop tokens aside, which end a grammar that is complete).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zayaserve.replicas.model.tokenizer import Tokenizer

__all__ = ["token_bytes", "tokenizer_info"]

REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Left context to decode each token after: decoders that treat the first token specially
# (SentencePiece-style space stripping) must see the token mid-sequence, as the detokenizer does.
_CONTEXT_TEXT = "a"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table (byte-level BPE's alphabet)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def _decoder_steps(decoder: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [s for d in decoder.get("decoders", []) for s in _decoder_steps(d)]
    return [decoder]


def _piece_bytes(piece: str, steps: Sequence[Mapping[str, Any]]) -> bytes | None:
    """The raw bytes one token adds mid-sequence, by the decoder chain, without the lossy
    UTF-8 conversion `tokenizers` ends with; None where a step is not understood."""
    out: str | bytes = piece
    fused = False
    for step in steps:
        kind = step.get("type")
        if kind == "Fuse":
            fused = True
        elif kind == "Strip":
            if not fused:  # before Fuse it strips every token, not just the first
                return None
        elif isinstance(out, bytes):
            return None
        elif kind == "ByteFallback":
            match = _BYTE_PIECE.fullmatch(out)
            if match:
                out = bytes([int(match.group(1), 16)])
        elif kind == "ByteLevel":
            table = _unicode_to_byte()
            # Like `tokenizers`: a piece with a character outside the alphabet stays as it is.
            if all(c in table for c in out):
                out = bytes(table[c] for c in out)
        elif kind == "Replace" and isinstance(step.get("pattern"), Mapping) \
                and "String" in step["pattern"]:
            out = out.replace(step["pattern"]["String"], str(step.get("content", "")))
        elif kind == "Metaspace":
            out = out.replace(str(step.get("replacement", "▁")), " ")
        else:
            return None
    return out if isinstance(out, bytes) else out.encode("utf-8")


def _skipped_ids(tokenizer: Tokenizer) -> set[int]:
    """The ids `decode(skip_special_tokens=True)` drops, and the config's bos/pad/eos."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special)
    return ids


def _decoder_json(hf: Any) -> Mapping[str, Any] | None:
    decoder = hf.decoder
    if decoder is None:
        return None
    try:  # the decoder alone: the whole tokenizer.json of a 262k vocab takes seconds to parse
        state = decoder.__getstate__()
        return dict(json.loads(state.decode() if isinstance(state, bytes) else state))
    except (AttributeError, TypeError, ValueError):
        return dict(json.loads(hf.to_str())["decoder"])


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """For each id below `vocab_size` (the model's logits width), the bytes the detokenizer
    adds for that token mid-sequence; b"" for special tokens, ids the tokenizer does not have,
    and tokens whose bytes cannot be determined (so that no grammar allows them)."""
    hf = tokenizer.hf
    n = min(vocab_size, int(hf.get_vocab_size(with_added_tokens=True)))
    skipped = _skipped_ids(tokenizer)
    context = tokenizer.encode(_CONTEXT_TEXT, add_special_tokens=False)
    base = tokenizer.decode(context)
    if not context or not base or REPLACEMENT_CHAR in base:
        raise ValueError(f"cannot decode {_CONTEXT_TEXT!r} as left context for the vocabulary")
    steps: list[Mapping[str, Any]] | None = None

    vocab = [b""] * vocab_size
    for i in range(n):
        if i in skipped:
            continue
        # One decode per token is faster than decode_batch, which spends its time on the list.
        text = hf.decode([*context, i], skip_special_tokens=True)
        if not text.startswith(base):
            continue  # the token rewrites its left context: no fixed bytes of its own
        added = text[len(base):]
        if REPLACEMENT_CHAR not in added:
            vocab[i] = added.encode("utf-8")
            continue
        # Part of a character (or several): its raw bytes, if they decode to what was written.
        if steps is None:
            steps = _decoder_steps(_decoder_json(hf))
        raw = _piece_bytes(str(hf.id_to_token(i)), steps)
        if raw is not None and raw.decode("utf-8", errors="replace") == added:
            vocab[i] = raw
    return vocab


def tokenizer_info(xgr: Any, tokenizer: Tokenizer, vocab_size: int,
                   stop_token_ids: Sequence[int]) -> Any:
    """The `xgr.TokenizerInfo` whose decoded vocab is `token_bytes` (a RAW vocab, so xgrammar
    takes the bytes as they are) with the given stop tokens; every other special token and
    every id past the tokenizer is empty, which xgrammar masks out of every grammar."""
    return xgr.TokenizerInfo(
        token_bytes(tokenizer, vocab_size),
        xgr.VocabType.RAW,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=False,
    )
