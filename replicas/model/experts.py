"""The expert side: stacked SiLU-GLU experts and the expert backend, the interface the attention
side calls.

The seam between attention and experts is one call, `experts(layer, hidden, expert_ids,
weights)`. In one process it is `LocalExpertBackend`; in the cluster `RemoteExpertBackend`
makes the same call over gRPC, through the token router (`zayaserve.router.token_router`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from zayaserve.kernels.registry import get_op
from zayaserve.router.dispatch_tracing import dispatch_group, traced_dispatch

if TYPE_CHECKING:
    from zayaserve.router.placement import PlacementMap

T = TypeVar("T")


class ExpertBackend(ABC):
    """Computes the expert outputs of one layer for a batch of routed tokens.

    Contract: `hidden` [T, H] in the model dtype, `expert_ids` [T] int64 in [0, num_experts]
    where `num_experts` is the skip class, `weights` [T] the MoE gate's probability. Returns [T, H]:
    `weight * expert(hidden)` per token, and exact zeros for skip tokens, which are never
    computed or sent anywhere.
    """

    num_experts: int

    @abstractmethod
    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor: ...


class ExpertWeights:
    """The experts of one layer that this process holds, stacked: local row i is expert
    `expert_ids[i]` of the checkpoint."""

    def __init__(self, expert_ids: Sequence[int], gate_up: torch.Tensor, down: torch.Tensor):
        assert gate_up.shape[0] == down.shape[0] == len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.gate_up = gate_up  # [E_local, 2I, H]
        self.down = down  # [E_local, H, I]
        self.row_of = {e: i for i, e in enumerate(self.expert_ids)}
        # global expert id -> local row; one past the largest held id (and beyond) -> -1
        table = torch.full((max(self.expert_ids, default=-1) + 2,), -1, dtype=torch.int64)
        table[self.expert_ids] = torch.arange(len(self.expert_ids))
        self._row_table = table
        self._device_tables: dict[torch.device, torch.Tensor] = {}

    def local_rows(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """[T] local rows, -1 for the skip class and for experts held elsewhere. The table is
        copied to each device once, so a decode step makes no host copy (graphs can hold it)."""
        table = self._device_tables.get(expert_ids.device)
        if table is None:
            table = self._device_tables[expert_ids.device] = self._row_table.to(expert_ids.device)
        return table[expert_ids.clamp(max=table.numel() - 1)]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def run_grouped(
    weights_of_layer: ExpertWeights,
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T] global ids; the skip class and unheld experts are ignored
    weights: torch.Tensor,  # [T]
) -> torch.Tensor:
    """Runs each held expert once on its tokens (the `fused_moe` op: grouped by expert)."""
    rows = weights_of_layer.local_rows(expert_ids)
    return get_op("fused_moe")(hidden, rows, weights, weights_of_layer.gate_up,
                               weights_of_layer.down)


class LocalExpertBackend(ExpertBackend):
    """Experts held in this process (the offline engine, tests, the embedded default)."""

    def __init__(self, layers: list[ExpertWeights], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        missing = [
            (i, e) for i, lw in enumerate(layers) for e in range(num_experts) if e not in lw.row_of]
        if missing:
            raise ValueError(f"local expert backend lacks (layer, expert) pairs: {missing[:4]}...")

    def __call__(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return run_grouped(self.layers[layer], hidden, expert_ids, weights)


class RemoteExpertBackend(ExpertBackend):
    """Experts on the expert shards, reached over gRPC by a `TokenRouter`.

    The router is asyncio code; it runs on a loop of its own, on a daemon thread. The engine
    thread blocks on each dispatch there, which releases the GIL, so the other micro-batch can
    compute meanwhile. `router_options` go to `TokenRouter` (deadline, waits, retries, the
    shards' RPC `token` and `max_message_bytes`).
    """

    def __init__(self, placement_source: Callable[[], PlacementMap], num_experts: int, *,
                 timeout_s: float | None = None, **router_options: Any) -> None:
        # Imported here: the offline engine never needs gRPC.
        from zayaserve.router.token_router import ExpertDispatchError, TokenRouter

        self.router = TokenRouter(placement_source, num_experts, **router_options)
        self.num_experts = num_experts
        self.timeout_s = timeout_s  # the router bounds every dispatch; this is a backstop
        self._timeout_error = ExpertDispatchError
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="zayaserve-token-router")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs a coroutine on the router's loop (gRPC objects belong to the loop they use)."""
        if _running_loop() is self.loop:
            raise RuntimeError("RemoteExpertBackend used on its own event loop (would deadlock)")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # do not leave the work running for nobody
            raise

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        group = dispatch_group(layer)  # None unless the micro-batch has traced requests
        dispatch = (self.router.dispatch(layer, hidden, expert_ids, weights) if group is None
                    else traced_dispatch(self.router, group, layer, hidden, expert_ids, weights))
        try:
            return self.run(dispatch, self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._timeout_error(
                f"layer {layer}: no answer within {self.timeout_s} s") from None

    def close(self) -> None:
        """Closes the router's channels and stops its loop; the backend is unusable after."""
        if not self.loop.is_closed():
            self.run(self.router.close(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
