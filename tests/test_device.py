"""The engine's device plumbing, tested where CI runs (the CPU): `auto` resolves here to the CPU,
a GPU that is not there is a clear error, every tensor the engine holds is on its device, and
every tensor the engine creates while stepping names its device (a factory call without one
would land on the CPU on a GPU host: the bug this guards against)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import zayaserve
from zayaserve import LLM, SamplingParams
from zayaserve.cluster.config import ClusterConfig
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.device import dtype_for, resolve_device
from zayaserve.replicas.engine.llm_engine import LLMEngine

ROOT = str(Path(zayaserve.__file__).resolve().parent) + "/"
# Factories that allocate a fresh tensor on the default (CPU) device unless told otherwise.
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
             torch.arange, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye,
             torch.randperm, torch.empty_strided}


class FactoryGuard(TorchFunctionMode):
    """Records package code that calls a tensor factory without `device=`."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and "torch/" in frame.f_code.co_filename:
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None and frame.f_code.co_filename.startswith(ROOT) and (
                    "-packages/" not in frame.f_code.co_filename):
                where = frame.f_code.co_filename[len(ROOT):]
                self.violations.append(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[LLMEngine]:
    yield LLMEngine(EngineConfig(model=str(tiny_checkpoint), num_kv_blocks=64,
                                 max_model_len=256))


def test_auto_resolves_to_what_torch_sees(engine: LLMEngine) -> None:
    """Here (CI, no GPU): the CPU with float32; on a GPU host: the GPU with bfloat16."""
    gpu = torch.cuda.is_available()
    assert resolve_device("auto").type == ("cuda" if gpu else "cpu")
    assert engine.config.device == "auto" and engine.device == resolve_device("auto")
    want = torch.bfloat16 if gpu else torch.float32
    assert dtype_for("auto", engine.device) == str(want).removeprefix("torch.")
    assert engine.model.dtype == want
    assert dtype_for("float16", engine.device) == "float16"


def _tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    yield f"{name}[{i}]", item


def test_everything_the_engine_holds_is_on_its_device(tiny_checkpoint: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint), device="cpu",
                                    num_kv_blocks=32, max_model_len=128))
    device = engine.device
    held = [(f"model.{n}", t) for n, t in [*engine.model.named_parameters(),
                                           *engine.model.named_buffers()]]
    held += [(f"cache.{n}", t) for n, t in _tensors(engine.cache)]
    for i, layer in enumerate(engine.experts.layers):  # type: ignore[attr-defined]
        held += [(f"experts[{i}].gate_up", layer.gate_up), (f"experts[{i}].down", layer.down)]
    assert len(held) > 20 and any(n.startswith("cache.k") for n, _ in held)
    off = [n for n, t in held if t.device != device]
    assert not off, f"held off {device}: {off[:5]}"


def test_a_step_creates_no_tensor_without_a_device(engine: LLMEngine) -> None:
    """Prefill, decode, n > 1 forks, prefix-cache hits, seeds, logprobs, prompt logprobs,
    penalties of min_tokens, stop strings, min_p and the repetition/presence/frequency
    penalties: every factory call in them names its device."""
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=5, seed=3, n=3, max_tokens=5,
                       logprobs=2, prompt_logprobs=1),
        SamplingParams(temperature=1.0, min_tokens=3, max_tokens=4, stop=["zz"], seed=1),
        SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=1.3, seed=2, n=2,
                       presence_penalty=0.5, frequency_penalty=0.5, max_tokens=5),
        SamplingParams(temperature=0, frequency_penalty=1.0, min_tokens=2, max_tokens=4),
    ]
    prompt = list(range(5, 45))  # long enough to fill and reuse prefix blocks
    guard = FactoryGuard()
    with guard:
        for round_ in range(2):  # the second round hits the prefix cache
            for i, p in enumerate(params):
                engine.add_request(f"r{round_}-{i}", prompt + [i], p)
            steps = 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
                assert steps < 200
    assert engine.stats()["prefix_cache_local_hit_tokens"] > 0
    assert not guard.violations, "tensors created without a device:\n" + "\n".join(
        sorted(set(guard.violations)))


def test_the_guard_catches_a_factory_without_a_device() -> None:
    guard = FactoryGuard()
    with guard:
        exec(compile("import torch\ntorch.zeros(3)\ntorch.zeros(3, device='cpu')",
                     ROOT + "replicas/fake_module.py", "exec"), {})
    assert guard.violations == ["replicas/fake_module.py:2 zeros"]


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "gpu"])
def test_bad_device_names_the_field(tiny_checkpoint: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="device"):
        LLM(model=str(tiny_checkpoint), device=bad)
    with pytest.raises(ValueError, match="engine.device"):
        ClusterConfig.create(engine={"device": bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a GPU")
def test_a_missing_gpu_is_a_clear_error(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="device: 'cuda' was asked for, but torch sees no GPU"):
        LLM(model=str(tiny_checkpoint), device="cuda")


def test_cluster_gpu_settings_reach_the_replicas() -> None:
    from zayaserve.cluster.app import _device_for

    cfg = ClusterConfig.create(attention_num_gpus=0.5, expert_num_gpus=1,
                               engine={"device": "auto"})
    assert (cfg.attention_num_gpus, cfg.expert_num_gpus) == (0.5, 1.0)
    assert _device_for("auto", 0) == "cpu" and _device_for("auto", 0.5) == "auto"
    with pytest.raises(ValueError, match="attention_num_gpus"):
        ClusterConfig.create(attention_num_gpus=-1)
