"""Three kinds of tokenizer for the random checkpoints, all built here without downloads, with
exactly the model's vocab size and the config's pad/bos/eos ids:

- `bytelevel`: the built-in byte-level BPE (`tokenizer_train.build_tokenizer`).
- `gemma`: laid out like Gemma's (and so ZAYA1's) tokenizer.json: a BPE with byte fallback and
  the 256 `<0x00>`..`<0xFF>` pieces, a Replace(' ' -> '▁') normalizer and no prefix space, and
  the decoders Replace('▁' -> ' '), ByteFallback, Fuse. Merges are learned on a seeded corpus
  with accents and CJK; rarer scripts and emoji are left to the byte pieces.
- `special`: the built-in byte-level BPE with chat/tool control tokens added as special tokens
  at ids inside the model vocab (where learned pieces would have been), plus a non-special
  added token at the last id.

`write_checkpoint` writes a full random checkpoint with the chosen tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from zayaserve.replicas.model.builtin import tokenizer_train as tt
from zayaserve.replicas.model.builtin.presets import preset_config
from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint
from zayaserve.replicas.model.tokenizer import Tokenizer as ZTokenizer

KINDS = ("bytelevel", "gemma", "special")

UNK_TOKEN = "<unk>"
# Control tokens of the `special` kind: skipped by decode(skip_special_tokens=True).
CONTROL_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<|im_start|>"]
# A plain-text added token (outside the model vocab): decode writes it as text.
PLAIN_ADDED_TOKEN = "<|file_sep|>"
META = "▁"

# Gemma pieces: what the learned merges and the alphabet may use. Characters outside the
# alphabet (Cyrillic, Arabic, most kana, emoji...) are spelled with byte pieces.
_GEMMA_ALPHABET = [chr(c) for c in range(0x21, 0x7F)] + list(META + "éüøñçàß日本語東京")
_GEMMA_EXTRA = ["日本語 東京 日本", "café über straße", "niño à ça", "🙂 привет", "東京 日本語"]
# Learned pieces at most; a bigger vocab is filled with concatenations (fast at 262k tokens).
_GEMMA_MAX_LEARNED = 2000


def preset_ids(preset: str = "tiny") -> dict[str, int]:
    """vocab_size, bos, eos (the first one) and pad ids of a preset's config."""
    cfg = preset_config(preset)
    eos = cfg["eos_token_id"]
    return {
        "vocab_size": int(cfg["vocab_size"]),
        "bos": int(cfg["bos_token_id"]),
        "eos": int(eos if isinstance(eos, int) else eos[0]),
        "pad": int(cfg["pad_token_id"]),
    }


def build(kind: str, preset: str = "tiny", seed: int = 0) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a kind, sized and laid out for the preset's config."""
    ids = preset_ids(preset)
    args = (ids["vocab_size"], ids["bos"], ids["eos"], ids["pad"])
    if kind == "bytelevel":
        tok = tt.build_tokenizer(*args, seed=seed)
    elif kind == "gemma":
        tok = build_gemma(*args, seed=seed)
    elif kind == "special":
        tok = build_special(*args, seed=seed)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {KINDS}")
    if tok.get_vocab_size(with_added_tokens=True) != ids["vocab_size"]:
        raise RuntimeError(f"{kind} tokenizer does not have {ids['vocab_size']} tokens")
    return tok


def tokenizer_config(kind: str) -> dict[str, Any]:
    """tokenizer_config.json of a kind: the built-in one's (chat template included)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tt.BOS_TOKEN,
        "eos_token": tt.EOS_TOKEN,
        "pad_token": tt.PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": tt.CHAT_TEMPLATE,
    }
    if kind == "gemma":
        config["unk_token"] = UNK_TOKEN
    if kind == "special":
        config["additional_special_tokens"] = list(CONTROL_TOKENS)
    return config


def load(kind: str, preset: str = "tiny", seed: int = 0) -> ZTokenizer:
    """The engine's tokenizer wrapper for a kind, as `Tokenizer.from_pretrained` would make it."""
    return ZTokenizer(build(kind, preset, seed), tokenizer_config(kind), preset_config(preset))


def write_checkpoint(out_dir: str | Path, kind: str, preset: str = "tiny", seed: int = 0) -> Path:
    """A random-weight checkpoint (`init_checkpoint`) whose tokenizer is of the given kind."""
    out = init_checkpoint(out_dir, preset, seed=seed)
    build(kind, preset, seed).save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(kind), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _bos_post_processor(bos_token_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{tt.BOS_TOKEN} $A",
        pair=f"{tt.BOS_TOKEN} $A {tt.BOS_TOKEN} $B",
        special_tokens=[(tt.BOS_TOKEN, bos_token_id)],
    )


def _learn_gemma_pieces(n_pieces: int, seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Alphabet plus learned pieces (in id order, at most n_pieces) and the merges behind them."""
    rng = random.Random(seed)
    lines = tt._corpus(rng, 4_000 + 12 * n_pieces) + _GEMMA_EXTRA * 40
    scratch = Tokenizer(models.BPE())
    scratch.normalizer = normalizers.Replace(" ", META)
    # SentencePiece learns pieces within words: split before each ▁ for training only.
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=n_pieces, min_frequency=2, show_progress=False,
        initial_alphabet=_GEMMA_ALPHABET, limit_alphabet=len(_GEMMA_ALPHABET))
    scratch.train_from_iterator(lines, trainer)
    model = json.loads(scratch.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].__getitem__)[:n_pieces]
    kept = set(pieces)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, [(a, b) for a, b in merges if a + b in kept]


def build_gemma(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                seed: int = 0) -> Tokenizer:
    """A Gemma-style byte-fallback BPE of exactly `vocab_size` tokens."""
    specials = tt._special_layout(vocab_size, pad_token_id, bos_token_id, eos_token_id)
    specials[tt._lowest_free(specials)] = UNK_TOKEN
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = vocab_size - len(specials) - len(byte_pieces)
    if n_pieces < len(_GEMMA_ALPHABET):
        raise ValueError(f"vocab_size={vocab_size} is too small for a Gemma-style tokenizer")
    vocab = {token: i for i, token in specials.items()}
    free_ids = (i for i in range(vocab_size) if i not in specials)
    for piece in byte_pieces:
        vocab[piece] = next(free_ids)
    pieces, merges = _learn_gemma_pieces(min(n_pieces, _GEMMA_MAX_LEARNED), seed)
    for piece in pieces:
        vocab[piece] = next(free_ids)
    # A corpus too small for the vocab: fill it with concatenations, as the built-in one does.
    rng = random.Random(seed * 1_000_003 + vocab_size)
    pool = [p for p in pieces if len(p) > 1] or pieces
    while len(vocab) < vocab_size:
        left, right = rng.choice(pool), rng.choice(pool)
        if left + right not in vocab and META not in right:
            merges.append((left, right))
            vocab[left + right] = next(free_ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN,
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", META)
    # Gemma 3's tokenizer.json keeps this split; after the normalizer it never fires.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = _bos_post_processor(bos_token_id)
    tok.add_special_tokens(
        [AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    return tok


def build_special(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int,
                  seed: int = 0) -> Tokenizer:
    """The built-in byte-level BPE with control tokens taking over the ids of learned pieces
    that no merge builds on, spread over the vocab (as Gemma keeps its control tokens in the
    model vocab), and a plain added token outside the model vocab taking the last id."""
    base = tt.build_tokenizer(vocab_size, bos_token_id, eos_token_id, pad_token_id, seed=seed)
    data = json.loads(base.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in data["model"]["merges"]]
    used = {part for merge in merges for part in merge}
    leaves = sorted((t for t in vocab if len(t) > 1 and t not in used
                     and vocab[t] not in base.get_added_tokens_decoder()), key=vocab.__getitem__)
    if len(leaves) <= len(CONTROL_TOKENS) or vocab[leaves[-1]] != vocab_size - 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for the added tokens")
    last = leaves.pop()
    replaced = sorted(random.Random(seed).sample(leaves, len(CONTROL_TOKENS)),
                      key=vocab.__getitem__)
    dropped = {last, *replaced}
    data["model"]["merges"] = [list(m) for m in merges if m[0] + m[1] not in dropped]
    del vocab[last]
    for old, new in zip(replaced, CONTROL_TOKENS, strict=True):
        vocab[new] = vocab.pop(old)
        data["added_tokens"].append(_added(vocab[new], new, special=True))
    # Not in the model vocab: `tokenizers` gives it the next id, the last of the model's.
    data["added_tokens"].append(_added(vocab_size - 1, PLAIN_ADDED_TOKEN, special=False))
    data["added_tokens"].sort(key=lambda t: t["id"])
    tok = Tokenizer.from_str(json.dumps(data))
    if tok.token_to_id(PLAIN_ADDED_TOKEN) != vocab_size - 1:
        raise RuntimeError(f"{PLAIN_ADDED_TOKEN} did not get id {vocab_size - 1}")
    return tok


def _added(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": not special, "special": special}
