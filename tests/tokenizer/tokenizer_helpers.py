"""What the tokenizer tests share: texts in many scripts, and a tokenizer folder written by the
built-in BPE trainer."""

from __future__ import annotations

import json
from pathlib import Path

from zayaserve.replicas.model.builtin.tokenizer_train import (
    write_tokenizer_files,
)

TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "  leading spaces, tabs\tand\nnew lines\r\n",
    "café naïve über straße niño Ærøskøbing",
    "日本語のテキスト、東京タワー。中文也可以",
    "emoji 🙂🚀 with modifiers 👍🏽 and ZWJ 👩‍👩‍👧 ❤️",
    "mixed: Привет мир, مرحبا, γειά σου — \u00a0nbsp",
    "",
]


def _write(tmp_path: Path, vocab: int = 512, eos: int = 1, config: dict | None = None) -> Path:
    write_tokenizer_files(tmp_path, vocab, bos_token_id=2, eos_token_id=eos, pad_token_id=0)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path
