"""A simulated accelerator for host-path benchmarks (SIMULATION: never in the serving path).

A device step is a timed sleep that releases the GIL, for as long as a real accelerator needs to
read the bytes that step touches over its HBM bandwidth (decode is memory-bound): every
attention-side parameter once (the tied embedding is read whole by the lm_head), per layer the
distinct experts the batch routes to (top-1 over `num_experts` plus the skip expert, uniform),
and the K/V of every visible position plus the CCA states. Shapes are ZAYA1-8B's (bf16), so the
step is about 0.7 ms at batch 1 and 5 ms from batch 16 on with the `h100` preset.

`SimulatedDevice.step(...)` is the device's stream: steps run one after another on their own
thread, so a host that does not wait for a step overlaps it. Logits come from a fixed random
table indexed by each row's input token (the tiny model's vocabulary), so outputs are a
deterministic function of the tokens and sync and async runs can be compared token for token.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from zayaserve.replicas.model.builtin.presets import checkpoint_shapes, preset_config

BANDWIDTH = {"h100": 3.35e12, "mi300x": 5.3e12}  # HBM bytes per second
PEAK_FLOPS = {"h100": 989e12, "mi300x": 1307e12}  # dense bf16 FLOP/s


def device_seconds(preset: str, nbytes: float, flops: float) -> float:
    """A device's time for work reading `nbytes` and doing `flops`: the slower of the two."""
    return max(nbytes / BANDWIDTH[preset], flops / PEAK_FLOPS[preset])


def hold(seconds: float) -> None:
    """Sleep (releasing the GIL) until `seconds` have passed, however early a sleep wakes."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        time.sleep(left)


@dataclass(frozen=True, slots=True)
class StepCost:
    """What a ZAYA1-8B step reads, by part (bytes)."""

    dense: float  # every attention-side parameter (embedding, attention, routers, norms)
    expert: float  # one expert of one layer (gate_up + down)
    kv_per_token: float  # K and V of one cached position, all layers
    state_per_seq: float  # CCA conv tail + delayed v of one sequence, all layers
    num_layers: int
    num_experts: int
    vocab: int = 262272
    hidden: int = 2048

    @classmethod
    def zaya1_8b(cls, bytes_per_param: int = 2) -> StepCost:
        cfg = preset_config("zaya1-8b")
        shapes = checkpoint_shapes(cfg)
        expert_params = sum(math.prod(s) for k, s in shapes.items() if ".mlp.experts." in k)
        dense = sum(math.prod(s) for s in shapes.values()) - expert_params
        layers, experts = cfg["num_hidden_layers"], cfg["num_experts"]
        kv = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * layers
        # conv tail (time0 + time1 - 1 steps of the conv channels) + the delayed v
        heads = cfg["num_attention_heads"] + cfg["num_key_value_heads"]
        conv = (cfg["cca_time0"] + cfg["cca_time1"] - 1) * heads * cfg["head_dim"]
        v = cfg["num_key_value_heads"] * cfg["head_dim"] // 2
        return cls(dense * bytes_per_param, expert_params / (layers * experts) * bytes_per_param,
                   kv * bytes_per_param, (conv + v) * layers * bytes_per_param * 2,
                   layers, experts, cfg["vocab_size"], cfg["hidden_size"])

    def distinct_experts(self, tokens: int) -> float:
        """Expected distinct experts per layer for `tokens` top-1 routes, uniform over the
        experts and the skip expert (which reads nothing)."""
        slots = self.num_experts + 1
        return self.num_experts * (1.0 - (1.0 - 1.0 / slots) ** tokens)

    def step_bytes(self, tokens: int, seqs: int, context: float) -> float:
        return (self.dense + self.num_layers * self.distinct_experts(tokens) * self.expert
                + seqs * (context * self.kv_per_token + self.state_per_seq))

    def expert_bytes(self, rows: int, experts_here: int) -> float:
        """One layer's expert weights read on a shard holding `experts_here` experts, for
        `rows` routed there (uniform routing over what it holds)."""
        distinct = experts_here * (1.0 - (1.0 - 1.0 / experts_here) ** rows) if rows else 0.0
        return distinct * self.expert

    def expert_flops(self, rows: int) -> float:
        """One layer's expert FLOPs for `rows` routed tokens (gate_up and down GEMMs)."""
        return rows * self.expert  # 2 FLOPs per weight, 2 bytes per weight

    def attention_bytes(self, tokens: int, context: float) -> float:
        """One layer's attention side (its share of the dense weights but the embedding) and
        the K/V its tokens read."""
        per_layer = (self.dense - self.embedding) / self.num_layers
        return per_layer + tokens * context * self.kv_per_token / self.num_layers

    @property
    def embedding(self) -> float:
        return self.vocab * self.hidden * 2.0

    def head_bytes(self) -> float:
        return self.embedding  # tied: the lm_head reads the whole embedding


class SimulatedDevice:
    """A single in-order stream of timed steps; counts the time it was busy."""

    def __init__(self, preset: str = "h100", vocab: int = 512, seed: int = 0) -> None:
        if preset not in BANDWIDTH:
            raise ValueError(f"preset: {preset!r} is not one of {sorted(BANDWIDTH)}")
        self.preset, self.bandwidth = preset, BANDWIDTH[preset]
        self.cost = StepCost.zaya1_8b()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=gen) * 3.0
        self.busy_s = 0.0
        self.steps = 0
        self.sampling_s = 0.0  # the host's sampling maths, timed by the benchmark
        self._lock = threading.Lock()
        self._stream = ThreadPoolExecutor(1, "sim-device")

    def seconds(self, tokens: int, seqs: int, context: float) -> float:
        return self.cost.step_bytes(tokens, seqs, context) / self.bandwidth

    def busy(self, seconds: float) -> None:
        """Occupy the device for `seconds` (on the calling thread; the GIL is released)."""
        t = time.perf_counter()
        hold(seconds)
        with self._lock:
            self.busy_s += time.perf_counter() - t
            self.steps += 1

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        return self.table[torch.tensor(input_ids, dtype=torch.long)]

    def submit(self, seconds: float) -> Future[None]:
        """Queue a step on the stream; the host goes on (the future is its completion)."""
        return self._stream.submit(self.busy, seconds)

    def reset(self) -> None:
        with self._lock:
            self.busy_s, self.steps, self.sampling_s = 0.0, 0, 0.0
