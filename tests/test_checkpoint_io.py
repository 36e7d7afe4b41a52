"""Checkpoint reader (our own safetensors parser) and the random checkpoint writer."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from zayaserve.replicas.model.builtin import random_checkpoint as ci
from zayaserve.replicas.model.builtin.presets import (
    checkpoint_shapes,
    count_params,
    preset_config,
)
from zayaserve.replicas.model.checkpoint_errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
)
from zayaserve.replicas.model.checkpoint_io import CheckpointReader
from zayaserve.replicas.model.config import ConfigError, ZayaConfig

MB = 1024 * 1024


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(9, 3, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(11, generator=g).to(torch.float16),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "u8": torch.arange(10, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
    }


def _raw_file(path: Path, header: dict[str, Any] | bytes, data: bytes,
              header_len: int | None = None) -> Path:
    """A safetensors file written byte by byte, so tests can break any part of it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _rchar() -> int:
    """Bytes this process has received from read-type syscalls (the kernel's own count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# -- reader ---------------------------------------------------------------------------------


def test_read_matches_safetensors_writer(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == sorted(tensors)
        assert reader.metadata == {"format": "pt"}
        for name, want in tensors.items():
            assert reader.shape(name) == tuple(want.shape)
            assert reader.dtype(name) == want.dtype
            got = reader.read(name, expect_shape=want.shape)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert reader.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
        # Returned tensors are private copies: writing one must not change the next read.
        got = reader.read("bf16")
        got.fill_(3.0)
        assert torch.equal(reader.read("bf16"), tensors["bf16"])
        assert reader.read("bf16", dtype=torch.float32).dtype == torch.float32
    # A path to the file itself works as well as its folder.
    with CheckpointReader(tmp_path / "model.safetensors") as reader:
        assert torch.equal(reader.read("f16"), tensors["f16"])


def test_read_rows_equals_slicing(tmp_path: Path) -> None:
    experts = torch.randn(16, 6, 5, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    save_file({"experts": experts}, str(tmp_path / "x.safetensors"))
    with CheckpointReader(tmp_path / "x.safetensors") as reader:
        for rows in ([3], [0, 1, 2, 3], [15, 2, 3, 4, 9], [7, 7], list(range(16)), []):
            got = reader.read_rows("experts", rows, expect_shape=(16, 6, 5))
            assert torch.equal(got, experts[rows]), rows
        assert torch.equal(reader.read_rows("experts", [2, 5], dtype=torch.float32),
                           experts[[2, 5]].float())
        with pytest.raises(TensorShapeError, match="out of range"):
            reader.read_rows("experts", [16])
        with pytest.raises(TensorShapeError, match=r"\(16, 6, 4\).*\(16, 6, 5\)"):
            reader.read_rows("experts", [0], expect_shape=(16, 6, 4))


def test_sharded_index(tmp_path: Path) -> None:
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for file_name, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(tmp_path / file_name))
        weight_map.update(dict.fromkeys(part, file_name))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with CheckpointReader(tmp_path) as reader:
        assert reader.names() == names
        for name in names:
            assert torch.equal(reader.read(name), tensors[name])
    # An index that points a tensor at a shard which lacks it is corrupt.
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CorruptCheckpointError, match=repr(names[0])):
        CheckpointReader(tmp_path)


def test_missing_tensor_and_shape_errors(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        with pytest.raises(MissingTensorError, match="'model.nope'.*not found") as err:
            reader.read("model.nope")
        assert str(tmp_path) in str(err.value)
        with pytest.raises(TensorShapeError, match=r"'a'.*expected shape \(3, 2\), found \(2, 3\)"):
            reader.read("a", expect_shape=(3, 2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path / "empty")


def _entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("case", [
    "bad_json", "not_object", "header_past_eof", "truncated_data", "overlap", "unknown_dtype",
    "size_mismatch", "too_short"])
def test_corrupt_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.safetensors"
    data = bytes(64)
    if case == "bad_json":
        _raw_file(path, b'{"a": {"dtype": "F32",', data)
    elif case == "not_object":
        _raw_file(path, b"[1, 2]", data)
    elif case == "header_past_eof":
        _raw_file(path, {"a": _entry("F32", [4], 0, 16)}, data, header_len=10_000)
    elif case == "truncated_data":
        _raw_file(path, {"a": _entry("F32", [32], 0, 128)}, data)
    elif case == "overlap":
        _raw_file(path, {"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, data)
    elif case == "unknown_dtype":
        _raw_file(path, {"a": _entry("F31", [4], 0, 16)}, data)
    elif case == "size_mismatch":
        _raw_file(path, {"a": _entry("BF16", [4], 0, 16)}, data)
    else:
        path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointReader(path)
    assert str(path) in str(err.value)


def test_unknown_model_type_is_a_config_error(tmp_path: Path) -> None:
    cfg = preset_config("tiny")
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type"):
        ZayaConfig.from_pretrained(tmp_path)


def test_only_requested_bytes_are_read(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    expert_shape = (16, 1024, 1024)  # 64 MB each in float32
    tensors = {
        "mlp.experts.gate_up_proj": torch.randn(expert_shape, generator=g),
        "mlp.experts.down_proj": torch.randn(expert_shape, generator=g),
        "attn.q_proj.weight": torch.randn(64, 64, generator=g),
        "norm.weight": torch.randn(64, generator=g),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    expert_bytes = 2 * 64 * MB
    small = ["attn.q_proj.weight", "norm.weight"]

    before = _rchar()
    reader = CheckpointReader(tmp_path)
    for name in small:
        assert torch.equal(reader.read(name), tensors[name])
    grew = _rchar() - before
    assert grew < 0.1 * expert_bytes, f"read {grew} bytes for two small tensors"
    assert reader.bytes_read == sum(tensors[n].numel() * 4 for n in small)

    one_expert = 64 * MB // 16
    before = _rchar()
    got = reader.read_rows("mlp.experts.down_proj", [5], expect_shape=expert_shape)
    grew = _rchar() - before
    assert torch.equal(got, tensors["mlp.experts.down_proj"][5:6])
    assert one_expert <= grew < one_expert + 256 * 1024, f"read {grew} bytes for one expert"
    reader.close()


# -- writer ---------------------------------------------------------------------------------


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="tiny"):
        ci.init_checkpoint("/nonexistent", preset="huge")


def test_param_counts() -> None:
    assert count_params("tiny") < 1_000_000
    assert 80e6 <= count_params("small") <= 130e6
    assert 8.0e9 <= count_params("zaya1-8b") <= 9.5e9


def test_tiny_checkpoint_loads_in_transformers(tiny_checkpoint: Path) -> None:
    import transformers
    cfg = ZayaConfig.from_pretrained(tiny_checkpoint)
    assert cfg.layer_types == ["hybrid", "hybrid_sliding"] * 2
    assert (tiny_checkpoint / "generation_config.json").is_file()
    assert (tiny_checkpoint / "tokenizer.json").is_file()

    model, info = transformers.ZayaForCausalLM.from_pretrained(
        tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ci.restore_hf_balancing_biases_(model, tiny_checkpoint)
    with CheckpointReader(tiny_checkpoint) as reader:
        state = model.state_dict()
        for name in reader.names():
            assert torch.equal(state[name], reader.read(name)), name
        temps = [reader.read(n) for n in reader.names() if n.endswith("qk_norm.temp")]
        assert all(bool((t > 0.3).all()) for t in temps)  # zero would flatten attention

    ids = torch.randint(4, cfg.vocab_size, (8, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.eval()(ids, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    assert len(set(out.logits[:, -1].argmax(-1).tolist())) >= 3

    skips = []
    for layer, logits in zip(model.model.layers, out.router_logits, strict=True):
        biased = torch.softmax(logits.float(), -1) + layer.mlp.gate.balancing_biases
        skips.append((biased.argmax(-1) == cfg.num_experts).float().mean())
    skip_fraction = float(torch.stack(skips).mean())
    assert 0.02 <= skip_fraction <= 0.6, skip_fraction


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = ci.init_checkpoint(tmp_path / "a", "tiny", seed=7)
    b = ci.init_checkpoint(tmp_path / "b", "tiny", seed=7)
    c = ci.init_checkpoint(tmp_path / "c", "tiny", seed=8)
    weights = "model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()
    assert (a / "config.json").read_text() == (c / "config.json").read_text()


def test_sharded_writer_matches_single_file(tmp_path: Path) -> None:
    single = ci.init_checkpoint(tmp_path / "one", "tiny", seed=1, dtype="bfloat16")
    sharded = ci.init_checkpoint(tmp_path / "many", "tiny", seed=1, dtype="bfloat16",
                                 max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    with CheckpointReader(single) as one, CheckpointReader(sharded) as many:
        assert one.names() == many.names()
        for name in one.names():
            want = torch.float32 if name.endswith("balancing_biases") else torch.bfloat16
            assert one.dtype(name) == many.dtype(name) == want
            assert torch.equal(one.read(name), many.read(name)), name
    assert ZayaConfig.from_pretrained(sharded).dtype == "bfloat16"


@pytest.mark.parametrize("overrides", [
    {}, {"attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False}])
def test_randomize_hf_model_matches_writer(tmp_path: Path, overrides: dict[str, Any]) -> None:
    import transformers
    cfg = preset_config("tiny", overrides=overrides)
    hf_cfg = transformers.ZayaConfig(**{k: v for k, v in cfg.items()
                                        if k not in ("architectures", "model_type")})
    model = transformers.ZayaForCausalLM(hf_cfg)
    ci.randomize_hf_model_(model, seed=4)
    model.save_pretrained(tmp_path / "hf")
    ours = ci.init_checkpoint(tmp_path / "ours", "tiny", seed=4, overrides=overrides)
    shapes = checkpoint_shapes(cfg)
    with CheckpointReader(tmp_path / "hf") as hf, CheckpointReader(ours) as mine:
        assert sorted(shapes) == hf.names() == mine.names()
        for name, shape in shapes.items():
            assert hf.shape(name) == shape
            assert torch.equal(hf.read(name), mine.read(name)), name
