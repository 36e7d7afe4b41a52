"""weights_identity hashes every byte of the weights, and remembers unchanged files' digests."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from zayaserve.replicas.kv_tiers import hashing
from zayaserve.replicas.kv_tiers.hashing import model_fingerprint, weights_identity
from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint

WINDOW = 1024  # what the old identity read at the start, middle and end of each tensor


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZAYASERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(hashing, "_RACY_NS", 0)  # remember files written just now
    return tmp_path / "home"


@pytest.fixture()
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files weights_identity actually reads, in order."""
    names: list[str] = []
    real = hashing.file_sha256

    def counting(path: Path) -> str:
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(hashing, "file_sha256", counting)
    return names


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("ck") / "untied", preset="tiny",
                           overrides={"tie_word_embeddings": False})


def _edit_row(path: Path, tensor: str, row: int, outside_windows: bool = True) -> None:
    """Flip the bytes of one row of a 2-D tensor in place (sizes and header unchanged)."""
    with path.open("r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(header_len))[tensor]
        begin, end = meta["data_offsets"]
        row_bytes = (end - begin) // meta["shape"][0]
        start = begin + row * row_bytes
        # The old identity sampled 3 x 1 KiB per tensor: this row lies outside all three.
        mid = (begin + end) // 2
        assert not outside_windows or all(start >= w + WINDOW or start + row_bytes <= w
                   for w in (begin, mid, end - WINDOW))
        f.seek(8 + header_len + start)
        data = f.read(row_bytes)
        f.seek(8 + header_len + start)
        f.write(bytes(b ^ 0xFF for b in data))


def test_one_row_of_lm_head_changes_the_identity(untied: Path, tmp_path: Path,
                                                 home: Path) -> None:
    config = json.loads((untied / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ident = weights_identity(untied)
    copy = shutil.copytree(untied, tmp_path / "copy", copy_function=shutil.copyfile)
    assert weights_identity(copy) == ident  # other folder, new mtimes, same bytes
    tuned = shutil.copytree(untied, tmp_path / "tuned")
    _edit_row(tuned / "model.safetensors", "lm_head.weight", config["vocab_size"] // 3)
    assert (tuned / "model.safetensors").stat().st_size == (untied / "model.safetensors").stat(
        ).st_size
    assert weights_identity(tuned) != ident
    assert model_fingerprint(config, weights_identity(tuned)) != model_fingerprint(config, ident)


def test_one_row_of_embeddings_changes_the_identity(tmp_path: Path, home: Path) -> None:
    tied = init_checkpoint(tmp_path / "tied", preset="tiny")
    ident = weights_identity(tied)
    _edit_row(tied / "model.safetensors", "model.embed_tokens.weight", 300)
    assert weights_identity(tied) != ident


def test_digests_are_remembered_until_a_file_changes(tmp_path: Path, home: Path,
                                                     hashed: list[str]) -> None:
    ck = init_checkpoint(tmp_path / "ck", preset="tiny", max_shard_bytes=200_000)
    shards = sorted(p.name for p in ck.glob("*.safetensors"))
    assert len(shards) > 1
    ident = weights_identity(ck)
    assert sorted(hashed) == shards and hashing.results_file().is_file()
    assert weights_identity(ck) == ident and len(hashed) == len(shards)  # nothing re-read
    # Edited in place with its size kept and its mtime put back: only ctime tells.
    victim = ck / shards[1]
    st = victim.stat()
    time.sleep(0.05)
    _edit_row(victim, _first_2d(victim), 1, outside_windows=False)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    edited = weights_identity(ck)
    assert hashed == [shards[1]] and edited != ident
    assert weights_identity(ck) == edited and hashed == [shards[1]]
    # A copy elsewhere is read once (new path and inode), and agrees.
    copy = shutil.copytree(ck, tmp_path / "copy")
    assert weights_identity(copy) == edited and len(hashed) == 1 + len(shards)


def _first_2d(path: Path) -> str:
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return next(n for n, t in sorted(header.items())
                if n != "__metadata__" and len(t["shape"]) == 2 and t["shape"][0] > 8)


def test_recent_files_and_broken_caches(untied: Path, tmp_path: Path, home: Path,
                                        hashed: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = shutil.copytree(untied, tmp_path / "fresh")
    monkeypatch.setattr(hashing, "_RACY_NS", 10**12)  # "just written": hash, don't remember
    ident = weights_identity(fresh)
    assert weights_identity(fresh) == ident and len(hashed) == 2
    monkeypatch.setattr(hashing, "_RACY_NS", 0)
    home.mkdir(exist_ok=True)
    hashing.results_file().write_text("{not json")  # a corrupt results file is ignored
    assert weights_identity(fresh) == ident and len(hashed) == 3
    assert weights_identity(fresh) == ident and len(hashed) == 3
    monkeypatch.setenv("ZAYASERVE_HOME", str(fresh / "config.json"))  # unwritable: still works
    assert weights_identity(fresh) == ident


def test_results_file_keeps_the_most_recent(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "_MAX_RESULTS", 3)
    for i in range(5):
        hashing._save_results({f"k{i}": {"sha256": "0" * 64, "used": i}})
    entries = json.loads(hashing.results_file().read_text())["entries"]
    assert sorted(entries) == ["k2", "k3", "k4"]
    assert not list(home.glob(".weights-sha256.*"))  # no temp files left behind


def test_numerics_version_is_in_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    fp = model_fingerprint({"hidden_size": 64}, "w")
    monkeypatch.setattr(hashing, "NUMERICS_VERSION", hashing.NUMERICS_VERSION + 1)
    assert model_fingerprint({"hidden_size": 64}, "w") != fp
