"""The token router as the attention side's synchronous `ExpertBackend`: the router's asyncio
loop runs on a daemon thread (`BackgroundLoop`), and `RemoteExpertBackend` blocks the engine
thread on each dispatch there, releasing the GIL so another micro-batch can compute."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from zayaserve.router.token_router import ExpertDispatchError, TokenRouter

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop on a daemon thread, so synchronous model code can await the router."""

    def __init__(self, name: str = "zayaserve-token-router") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class RemoteExpertBackend:
    """The `ExpertBackend` call shape over a `TokenRouter` whose loop runs on another thread."""

    def __init__(self, router: TokenRouter, loop: asyncio.AbstractEventLoop,
                 *, timeout_s: float | None = None) -> None:
        self.router = router
        self.loop = loop
        self.num_experts = router.num_experts
        self.timeout_s = timeout_s  # the router bounds every dispatch; this is a backstop

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("RemoteExpertBackend called on its own event loop (would deadlock)")
        future = asyncio.run_coroutine_threadsafe(
            self.router.dispatch(layer, hidden, expert_ids, weights), self.loop)
        try:
            return future.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # do not leave the dispatch running for nobody
            raise ExpertDispatchError(
                f"layer {layer}: no answer within {self.timeout_s} s") from None


__all__ = ["BackgroundLoop", "RemoteExpertBackend"]
