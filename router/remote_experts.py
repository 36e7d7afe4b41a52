"""The expert backend of the cluster: the model's `ExpertBackend` call made over gRPC to the
expert shards, through a `TokenRouter` on an event loop of its own. The attention worker
injects it into the engine; the model and engine never import it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import torch

from zayaserve.replicas.model.experts import ExpertBackend
from zayaserve.replicas.observability.dispatch_tracing import dispatch_group, traced_dispatch
from zayaserve.router.placement import PlacementMap
from zayaserve.router.token_router import ExpertDispatchError, TokenRouter

T = TypeVar("T")


class RemoteExpertBackend(ExpertBackend):
    """Experts on the expert shards, reached over gRPC by a `TokenRouter`.

    The router is asyncio code; it runs on a loop of its own, on a daemon thread. The engine
    thread blocks on each dispatch there, which releases the GIL, so the other micro-batch can
    compute meanwhile. `router_options` go to `TokenRouter` (deadline, waits, retries, the
    shards' RPC `token` and `max_message_bytes`).
    """

    def __init__(self, placement_source: Callable[[], PlacementMap], num_experts: int, *,
                 timeout_s: float | None = None, **router_options: Any) -> None:
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
