"""`model="random:<preset>[@seed]"`: a preset's random weights made where they will live (no
checkpoint on disk). On the CPU they equal what `init-checkpoint` writes, so the engine on them
matches the engine on the written checkpoint token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zayaserve import LLM, SamplingParams
from zayaserve.replicas.model.builtin.presets import count_params
from zayaserve.replicas.model.builtin.random_weights import RandomWeights, is_random, parse
from zayaserve.replicas.model.checkpoint_errors import MissingTensorError, TensorShapeError
from zayaserve.replicas.model.checkpoint_io import CheckpointReader

PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
PROMPTS = [{"prompt_token_ids": [5, 60, 7, 300, 9]}, {"prompt_token_ids": list(range(20, 50))}]


def _outputs(llm: LLM) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(PROMPTS, PARAMS)  # type: ignore[arg-type]
    return [(o.outputs[0].token_ids,
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs or [],
                                             o.outputs[0].token_ids, strict=True)])
            for o in outs]


def test_random_tiny_is_the_written_tiny_checkpoint(tiny_checkpoint: Path) -> None:
    written = _outputs(LLM(model=str(tiny_checkpoint), device="cpu"))
    made = LLM(model="random:tiny", device="cpu")
    assert made.engine.tokenizer is None  # takes token ids
    assert _outputs(made) == written
    with CheckpointReader(tiny_checkpoint) as disk:
        weights = RandomWeights("random:tiny")
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.balancing_biases"):
            assert torch.equal(weights.read(name), disk.read(name, dtype=torch.float32))
        rows = weights.read_rows("model.layers.0.mlp.experts.down_proj", [5, 1])
        assert torch.equal(rows, disk.read_rows("model.layers.0.mlp.experts.down_proj", [5, 1]))


def test_the_seed_and_the_preset_pick_the_weights() -> None:
    a, b = LLM(model="random:tiny@0", device="cpu"), LLM(model="random:tiny@1", device="cpu")
    assert _outputs(a) != _outputs(b)
    assert a.engine.fingerprint != b.engine.fingerprint  # never share prefix-cache entries
    assert parse("random:zaya1-8b@7") == ("zaya1-8b", 7) and is_random("random:tiny")
    assert not is_random("/models/tiny")


def test_full_size_preset_without_generating_it() -> None:
    weights = RandomWeights("random:zaya1-8b", "meta")
    assert weights.config.num_hidden_layers == 40 and weights.config.hidden_size == 2048
    assert 8.0e9 < count_params("zaya1-8b") < 9.0e9
    assert weights.shapes["model.embed_tokens.weight"] == (262272, 2048)


@pytest.mark.parametrize("bad", ["random:", "random:huge", "random:tiny@x", "random:tiny@-1"])
def test_bad_random_specs_name_the_field(bad: str) -> None:
    with pytest.raises(ValueError, match="model: .*random:<preset>"):
        LLM(model=bad, device="cpu")


def test_reads_are_checked() -> None:
    weights = RandomWeights("random:tiny")
    with pytest.raises(MissingTensorError, match="no tensor 'nope'"):
        weights.read("nope")
    with pytest.raises(TensorShapeError, match="model.norm.weight"):
        weights.read("model.norm.weight", expect_shape=(3,))
