"""Decode steps replayed from captured CUDA/HIP graphs: whole, or split at the experts.

A decode step (one new token per sequence) launches a few hundred small kernels; at small
batches launching them costs more than running them. As in vLLM, each padded batch size (a
bucket) is captured once and replayed.

With experts in this process and the Triton fused MoE (which groups tokens by expert on the
device: no host-side sizes), the whole step is one graph (`whole_step`). Otherwise the experts
stay eager: the torch fused MoE needs group sizes on the host, and remote experts a network
round trip, neither of which a graph can hold. Then a bucket is L + 1 graph segments around L
eager expert calls:

    segment 0      embed, RoPE tables, layer 0 up to its gate
    segment i      layer i-1's expert output into the residual, layer i up to its gate
    segment L      the last expert output into the residual, final norm, lm_head

Everything a segment reads lives in static buffers that each step overwrites in place; padding
rows decode a dummy token into the cache's scratch block and scratch state slot, which no
sequence owns. Prefix-cache snapshots are taken after the replay, for all layers at once (a
decode step moves each state exactly once, so the slot holds what the block needs).

`GraphCapture` is what captures: `CudaGraphCapture` on a GPU; tests use one that re-runs
the segment's Python against the same static buffers, which checks everything but the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from zayaserve.kernels.paged_attention_ref import static_decode_plan
from zayaserve.kernels.registry import default_kernels
from zayaserve.replicas.model.attention_side import AttentionLayer, AttentionSideModel
from zayaserve.replicas.model.batch import StepBatch
from zayaserve.replicas.model.experts import ExpertBackend, LocalExpertBackend
from zayaserve.replicas.model.kv_cache import KVCache

Outputs = tuple[torch.Tensor, ...]
Segment = Callable[[], Outputs]


class GraphCapture(Protocol):
    def capture(self, segment: Segment) -> tuple[Callable[[], None], Outputs]:
        """Captures `segment`; returns (replay, the outputs every replay rewrites)."""


class CudaGraphCapture:
    """torch.cuda graphs (HIP graphs on ROCm builds), all in one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, segment: Segment) -> tuple[Callable[[], None], Outputs]:
        # One eager run on a side stream first: lazy initialisation, Triton autotuning and
        # cached tables happen there, not inside the capture.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            segment()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = segment()
        return graph.replay, outputs


class RerunCapture:
    """Replays by re-running the segment's Python and copying into the first run's outputs:
    what a graph does, minus the driver. For tests on machines without a GPU."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, segment: Segment) -> tuple[Callable[[], None], Outputs]:
        self.captures += 1
        outputs = segment()

        def replay() -> None:
            self.replays += 1
            for out, new in zip(outputs, segment(), strict=True):
                out.copy_(new)

        return replay, outputs


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


class _Inputs:
    """A bucket's static inputs, laid out so that one host-to-device copy fills them all."""

    PARTS = 5  # input ids, positions, KV slots, state slots, context lengths

    def __init__(self, size: int, width: int, device: torch.device) -> None:
        n = size * (self.PARTS + width)
        self.size, self.width = size, width
        self.host = torch.empty(n, dtype=torch.int64, device="cpu",
                                pin_memory=device.type == "cuda")
        self.device = torch.zeros(n, dtype=torch.int64, device=device)
        views = self.device.split([size] * self.PARTS + [size * width])
        self.input_ids, self.positions, self.slot_mapping, self.state_slots = views[:4]
        self.context_lens = views[4]
        self.block_tables = views[5].view(size, width)
        self.rows = torch.arange(size, dtype=torch.int64, device=device)
        self.query_start = torch.arange(size + 1, dtype=torch.int64, device=device)

    def fill(self, chunks: list[tuple[list[int], int, list[int], int]], cache: KVCache) -> None:
        """This step, padded with rows that decode token 0 into the cache's scratch space.

        Only the block-table columns this step uses are copied: columns past a sequence's
        context are never read (the Triton kernel stops at the context, the torch plan masks
        them), so what earlier steps left there is harmless."""
        bs, scratch, size = cache.block_size, cache.scratch_block, self.size
        pad = size - len(chunks)
        used = max([len(c[2]) for c in chunks] + [1])
        values = [c[0][0] for c in chunks] + [0] * pad
        values += [c[1] for c in chunks] + [0] * pad
        values += [c[2][c[1] // bs] * bs + c[1] % bs for c in chunks] + [scratch * bs] * pad
        values += [c[3] for c in chunks] + [cache.scratch_state_slot] * pad
        values += [c[1] + 1 for c in chunks] + [1] * pad
        for c in chunks:
            values += c[2] + [-1] * (used - len(c[2]))
        values += ([scratch] + [-1] * (used - 1)) * pad
        n = len(values)
        self.host[:n] = torch.tensor(values, dtype=torch.int64, device="cpu")
        head = self.PARTS * size
        self.device[:head].copy_(self.host[:head], non_blocking=True)
        self.block_tables[:, :used].copy_(self.host[head:n].view(size, used), non_blocking=True)

    def batch(self) -> StepBatch:
        size = self.size
        return StepBatch(
            input_ids=self.input_ids, positions=self.positions, token_seq=self.rows,
            query_start=self.query_start, query_lens=[1] * size,
            context_lens=[0] * size,  # a host list nothing on the graph path reads
            slot_mapping=self.slot_mapping, block_tables=self.block_tables,
            state_slots=self.state_slots, logits_indices=self.rows)


@dataclass
class _Bucket:
    inputs: _Inputs
    segments: list[Callable[[], None]]
    expert_inputs: list[Outputs]  # per layer: (x, expert ids, gate weights)
    logits: torch.Tensor  # [B, V]


class DecodeGraphs:
    def __init__(self, model: AttentionSideModel, experts: ExpertBackend, cache: KVCache,
                 max_batch: int, max_blocks_per_seq: int, capture: GraphCapture,
                 buckets: Sequence[int] | None = None, whole_step: bool | None = None) -> None:
        self.model, self.experts, self.cache, self.capture = model, experts, cache, capture
        # One graph per step when the experts can live inside it (see the module docstring).
        self.whole_step = (isinstance(experts, LocalExpertBackend)
                           and default_kernels() == "triton") if whole_step is None else whole_step
        self.buckets = sorted(buckets or default_buckets(max_batch))
        self.width = max_blocks_per_seq
        # The experts' output, read by the next segment (shared by all buckets).
        self.y = torch.zeros(self.buckets[-1], model.config.hidden_size, dtype=model.dtype,
                             device=cache.device)
        self._graphs: dict[int, _Bucket] = {}

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def can_run(self, chunks: list[tuple[list[int], int, list[int], int]]) -> bool:
        """A decode-only step whose batch has a bucket and whose tables fit the graphs."""
        return (self.bucket_for(len(chunks)) is not None
                and all(len(c[0]) == 1 and len(c[2]) <= self.width for c in chunks))

    @torch.inference_mode()
    def run(self, chunks: list[tuple[list[int], int, list[int], int]], rows: list[int],
            snapshots: list[tuple[int, int]] | None) -> torch.Tensor:
        """A decode-only step (every chunk one token); returns logits [len(rows), V]."""
        n = len(chunks)
        size = self.bucket_for(n)
        assert size is not None, "not a graph step (the runner checks can_run)"
        bucket = self._graphs.get(size) or self._capture(size)
        bucket.inputs.fill(chunks, self.cache)
        if not bucket.expert_inputs:  # the whole step in one graph
            bucket.segments[0]()
        for layer, replay in enumerate(bucket.segments if bucket.expert_inputs else ()):
            replay()
            if layer < len(bucket.expert_inputs):
                x, ids, weights = bucket.expert_inputs[layer]
                self.y[:n] = self.experts(layer, x[:n], ids[:n], weights[:n])
        if snapshots:
            self._snapshot(chunks, snapshots)
        if rows == list(range(len(rows))):
            return bucket.logits[:len(rows)]
        return bucket.logits[torch.tensor(rows, device="cpu").to(self.cache.device)]

    def _snapshot(self, chunks: list[tuple[list[int], int, list[int], int]],
                  snapshots: list[tuple[int, int]]) -> None:
        conv_snap, v_snap = self.cache.conv_snap, self.cache.v_snap
        assert conv_snap is not None and v_snap is not None
        index = torch.tensor([[chunks[r][3] for r, _ in snapshots], [b for _, b in snapshots]],
                             device="cpu").to(self.cache.device)
        conv_snap[:, index[1]] = self.cache.conv_state[:, index[0]]
        v_snap[:, index[1]] = self.cache.v_state[:, index[0]]

    def _capture(self, size: int) -> _Bucket:
        inputs = _Inputs(size, self.width, self.cache.device)
        inputs.fill([], self.cache)  # all padding: the warm-up runs write only scratch space
        model, cache, layers = self.model, self.cache, self.model.layers
        batch, y = inputs.batch(), self.y[:size]
        kinds = sorted(model.ropes_kinds())
        torch_attention = default_kernels() == "torch"

        def first() -> Outputs:
            # Derived per-step tensors are rebuilt inside the graph on every replay.
            batch._memo["context_lens"] = inputs.context_lens.to(torch.int32)
            if torch_attention:
                batch._memo["attention_plan"] = static_decode_plan(
                    inputs.block_tables, inputs.context_lens, cache.block_size)
            residual, ropes = model.embed(batch)
            tables = tuple(t for kind in kinds for t in ropes[kind])
            return (*_attend(layers[0], residual, None, ropes, batch, cache), *tables)

        if self.whole_step:
            return self._capture_whole(size, inputs, batch, first)
        segments, expert_inputs = [], []
        with torch.inference_mode():
            replay, out = self.capture.capture(first)
            segments.append(replay)
            tables = out[5:]
            ropes = {kind: (tables[2 * j], tables[2 * j + 1]) for j, kind in enumerate(kinds)}
            for layer in layers[1:]:
                expert_inputs.append(out[2:5])
                prev = layers[layer.layer_idx - 1]

                def step(layer: AttentionLayer = layer, prev: AttentionLayer = prev,
                         residual: torch.Tensor = out[0], state: torch.Tensor = out[1],
                         ) -> Outputs:
                    res = prev.finish(y, residual)
                    return _attend(layer, res, state, ropes, batch, cache)

                replay, out = self.capture.capture(step)
                segments.append(replay)
            expert_inputs.append(out[2:5])

            def last(residual: torch.Tensor = out[0]) -> Outputs:
                return (model.head(layers[-1].finish(y, residual), batch.logits_indices),)

            replay, (logits,) = self.capture.capture(last)
            segments.append(replay)
        self._graphs[size] = _Bucket(inputs, segments, expert_inputs, logits)
        return self._graphs[size]


    def _capture_whole(self, size: int, inputs: _Inputs, batch: StepBatch,
                       first: Segment) -> _Bucket:
        """One graph for the whole step: every layer's experts run inside it. `batch` is the
        one `first` fills per replay (its derived tensors are memoised on it)."""
        model, cache, layers, experts = self.model, self.cache, self.model.layers, self.experts
        kinds = sorted(self.model.ropes_kinds())

        def whole() -> Outputs:
            out = first()
            tables = out[5:]
            ropes = {kind: (tables[2 * j], tables[2 * j + 1]) for j, kind in enumerate(kinds)}
            for layer in layers[1:]:
                prev = layers[layer.layer_idx - 1]
                y = experts(prev.layer_idx, *out[2:5])
                out = _attend(layer, prev.finish(y, out[0]), out[1], ropes, batch, cache)
            y = experts(layers[-1].layer_idx, *out[2:5])
            return (model.head(layers[-1].finish(y, out[0]), batch.logits_indices),)

        with torch.inference_mode():
            replay, (logits,) = self.capture.capture(whole)
        self._graphs[size] = _Bucket(inputs, [replay], [], logits)
        return self._graphs[size]


def _attend(layer: AttentionLayer, residual: torch.Tensor, state: torch.Tensor | None,
            ropes: dict[str, tuple[torch.Tensor, torch.Tensor]], batch: StepBatch,
            cache: KVCache) -> Outputs:
    """A layer up to its gate, as a segment's outputs: (residual, router state, x, ids, w)."""
    residual, x, routing = layer.attend(residual, state, ropes[layer.layer_type], batch, cache)
    return residual, routing.state, x, routing.expert_ids, routing.weights
