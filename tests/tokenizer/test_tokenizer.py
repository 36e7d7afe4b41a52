"""The tokenizer wrapper and the locally built BPE: exact vocab and special ids, determinism,
round trips, special tokens, and config files (chat templates: test_chat_template.py; the
streaming detokenizer: test_detokenizer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizer_helpers import TEXTS, _write

from zayaserve.replicas.model.builtin import tokenizer_train
from zayaserve.replicas.model.builtin.tokenizer_train import (
    BOS_TOKEN,
    END_OF_TURN,
    PAD_TOKEN,
    START_OF_TURN,
    write_tokenizer_files,
)
from zayaserve.replicas.model.tokenizer import Tokenizer

# --- building --------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab, eos", [(512, 1), (512, 106), (8192, 106)])
def test_exact_vocab_size_and_special_ids(
    built: Callable[[int, int], Tokenizer], vocab: int, eos: int
) -> None:
    tok = built(vocab, eos)
    assert tok.vocab_size == vocab
    assert tok.hf.get_vocab_size(with_added_tokens=False) == vocab
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_ids) == (0, 2, [eos])
    assert tok.token_to_id(PAD_TOKEN) == 0
    assert tok.token_to_id(BOS_TOKEN) == 2
    assert tok.token_to_id(END_OF_TURN) == eos
    start = tok.token_to_id(START_OF_TURN)
    assert start is not None and start < 110
    assert tok.all_special_ids == sorted({0, 2, eos, start})
    # Every id the model can sample maps to a token.
    assert all(tok.id_to_token(i) is not None for i in range(vocab))
    assert tok.id_to_token(vocab) is None


def test_gemma_layout_for_eos_106(small: Tokenizer) -> None:
    assert small.token_to_id(START_OF_TURN) == 105


def test_build_is_deterministic(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in [(a, 0), (b, 0), (c, 1)]:
        write_tokenizer_files(out, 512, bos_token_id=2, eos_token_id=1, pad_token_id=0, seed=seed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()


def test_build_is_deterministic_across_processes(tmp_path: Path) -> None:
    # A fresh interpreter gets a different str hash seed and Rust HashMap seeds; the builder has
    # no package imports, so it runs by path without importing zayaserve (and torch).
    code = (
        "import runpy, sys; m = runpy.run_path(sys.argv[1]); "
        "m['write_tokenizer_files'](sys.argv[2], 512, 2, 1, 0, seed=0)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", code, tokenizer_train.__file__, str(tmp_path / "sub")],
        check=True,
        env=env,
    )
    _write(tmp_path / "here")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "sub" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_synthetic_fill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large vocabs learn MAX_LEARNED_MERGES and fill the rest with synthetic merges; exercise
    # that path on a small vocab.
    monkeypatch.setattr(tokenizer_train, "MAX_LEARNED_MERGES", 64)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        write_tokenizer_files(out, 2048, bos_token_id=2, eos_token_id=106, pad_token_id=0)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = Tokenizer.from_pretrained(a)
    assert tok.vocab_size == 2048
    assert len(json.loads((a / "tokenizer.json").read_text())["model"]["merges"]) >= 2048 - 264
    assert all(tok.id_to_token(i) is not None for i in range(2048))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_tiny_build_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    _write(tmp_path)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "vocab, ids", [(200, (0, 2, 1)), (512, (0, 2, 2)), (512, (0, 2, 512)), (512, (-1, 2, 1))]
)
def test_bad_build_arguments(tmp_path: Path, vocab: int, ids: tuple[int, int, int]) -> None:
    pad, bos, eos = ids
    with pytest.raises(ValueError):
        write_tokenizer_files(tmp_path, vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


@pytest.mark.slow
def test_full_zaya_vocab(tmp_path: Path) -> None:
    start = time.perf_counter()
    tok = Tokenizer.from_pretrained(_write(tmp_path, 262272, eos=106))
    assert time.perf_counter() - start < 60
    assert tok.vocab_size == 262272
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (2, [106], 0)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


# --- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny: Tokenizer, small: Tokenizer, text: str) -> None:
    for tok in (tiny, small):
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_merges_shrink_common_text(small: Tokenizer) -> None:
    text = "café " * 20 + "日本語 " * 20
    assert len(small.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_special_tokens_in_text(tiny: Tokenizer) -> None:
    ids = tiny.encode("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
    assert ids[0] == tiny.token_to_id(START_OF_TURN)
    assert ids[-1] == tiny.token_to_id(END_OF_TURN)
    assert tiny.decode(ids) == "user\nhi"
    assert tiny.decode(ids, skip_special_tokens=False) == "<start_of_turn>user\nhi<end_of_turn>"


def test_bos_added_once(tiny: Tokenizer) -> None:
    # tokenizer.json's post-processor and add_bos_token both ask for bos; it must appear once.
    assert tiny.encode("hi").count(2) == 1


def test_bos_from_add_bos_token_without_post_processor(tmp_path: Path) -> None:
    path = _write(tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_pretrained(path)
    assert tok.encode("hi")[0] == 2
    assert tok.encode("hi", add_special_tokens=False)[0] != 2


# --- loading ---------------------------------------------------------------------------------


def test_eos_list_in_config_json(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(
        _write(tmp_path, config={"eos_token_id": [106, 3], "bos_token_id": 2, "pad_token_id": 0})
    )
    # config.json first; the tokenizer's own eos token is added when missing.
    assert tok.eos_token_ids == [106, 3, 1]
    assert tok.bos_token_id == 2


def test_eos_int_in_config_json(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_write(tmp_path, config={"eos_token_id": 1}))
    assert tok.eos_token_ids == [1]


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_files_name_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json"):
        Tokenizer.from_pretrained(path)
    (path / "config.json").unlink()
    (path / "tokenizer.json").write_text('{"model": 5}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(path)


def test_without_tokenizer_config(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_ids == []
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_tokens_from_config_json_only(tmp_path: Path) -> None:
    path = _write(tmp_path, config={"bos_token_id": 2, "eos_token_id": [1]})
    (path / "tokenizer_config.json").unlink()
    (path / "chat_template.jinja").write_text("{{ bos_token }}|{{ eos_token }}")
    tok = Tokenizer.from_pretrained(path)
    assert tok.apply_chat_template([]) == "<bos>|<end_of_turn>"


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    path = _write(tmp_path)
    (path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_pretrained(path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


# --- chat template ---------------------------------------------------------------------------
