"""Dispatch/combine over gRPC for the attention side when experts live elsewhere (its expert
backend, `router.remote_experts.RemoteExpertBackend`, calls `TokenRouter.dispatch`).

One `dispatch` per (micro-batch, layer): drop skip tokens, group the rest by the shard chosen for
their expert, send every shard its rows at once, and put the answers back in token order. A
failed call's rows go to another replica of the same experts; with none left the router re-reads
the placement map and waits, bounded, for one to appear (a restarted shard registers anew).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from zayaserve.router.dispatch_plan import plan_rows
from zayaserve.router.placement import PlacementMap
from zayaserve.router.router_stats import LatencyHistogram, LayerLatency, RouterStats
from zayaserve.router.shard_calls import ShardCalls, ShardFailure
from zayaserve.router.shard_channels import ShardChannels
from zayaserve.router.tensor_codec import (
    MAX_MESSAGE_BYTES,
    WIRE_DTYPES,
    pinned_host_copy,
)

# Codes that say "this replica is not there (now)", or "busy now" (its call cap, which foreign
# calls may fill; our calls are checked against the size cap before they go): waiting for a
# replica is bounded by time.
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
# Codes that retrying cannot fix: our request (or our token) is wrong. Everything else
# (deadline, a stale map's FAILED_PRECONDITION, INTERNAL) is retried, at most max_retries times.
_FATAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
          grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class ExpertDispatchError(RuntimeError):
    """An expert dispatch that cannot complete; the message names the layer and experts.

    `retryable`: the fault lies with a peer (a shard away, or misbehaving), not with the engine
    that asked, so the engine fails the step's requests as retryable and keeps serving."""

    retryable = True


class NoExpertReplicaError(ExpertDispatchError):
    """No live shard held these experts within the router's wait bound."""

    def __init__(self, layer: int, experts: Sequence[int], waited_s: float, version: int,
                 last_error: str = "") -> None:
        self.layer, self.experts, self.waited_s = layer, list(experts), waited_s
        super().__init__(
            f"no live replica for experts {self.experts} of layer {layer} after waiting "
            f"{waited_s:.2f} s (placement version {version})"
            + (f"; last error: {last_error}" if last_error else ""))


class ExpertShardError(ExpertDispatchError):
    """A shard refused the rows for a reason retrying does not fix, or failed too often."""


@dataclass(slots=True)
class _Attempt:
    """The dispatch-wide retry budget: the wait clock and the count of real failures."""

    wait_started: float | None = None
    failures: int = 0
    last_error: str = ""


class TokenRouter:
    """Sends one layer's routed tokens to the expert shards and combines the answers.

    Contract: `dispatch` returns exactly what a local expert backend would (exact zeros for skip
    rows, which are never sent), or raises `ExpertDispatchError`; it never hangs: waiting for a
    replica is bounded by `wait_for_replica_s`, failures other than "unreachable" by
    `max_retries`, each call by `deadline_s`. Use from one asyncio loop (channels belong to it).
    `placement_source()` must be cheap and non-blocking: it is read at every dispatch. Every call
    carries `token` (the deployment's shard RPC token; None: none is sent); one larger than
    `max_message_bytes` (the shards' cap) fails at once instead of being sent. With `stream`
    (the default) rows travel on one persistent stream per shard as raw messages; a traced
    dispatch (which carries its trace context per call) and `stream=False` use unary calls.
    """

    def __init__(
        self,
        placement_source: Callable[[], PlacementMap],
        num_experts: int,
        *,
        deadline_s: float = 5.0,
        wait_for_replica_s: float = 30.0,
        max_retries: int = 3,
        poll_interval_s: float = 0.05,
        token: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        stream: bool = True,
    ) -> None:
        if min(deadline_s, poll_interval_s, num_experts) <= 0:
            raise ValueError("deadline_s/poll_interval_s/num_experts: must be > 0")
        if min(wait_for_replica_s, max_retries) < 0:
            raise ValueError("wait_for_replica_s/max_retries: must be >= 0")
        self.placement_source = placement_source
        self.num_experts = num_experts
        self.deadline_s = deadline_s
        self.wait_for_replica_s = wait_for_replica_s
        self.max_retries = max_retries
        self.poll_interval_s = poll_interval_s
        self.stream = stream  # one persistent dispatch stream per shard (else unary calls)
        self.stats = RouterStats()
        self._placement: PlacementMap | None = None
        self._channels = ShardChannels(close_grace_s=deadline_s, token=token,
                                       max_message_bytes=max_message_bytes)
        self._calls = ShardCalls(self._channels, self.stats, deadline_s, stream)
        self._turns: defaultdict[int, int] = defaultdict(int)  # expert -> ties broken so far

    async def dispatch(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T] in [0, num_experts]; num_experts = skip
        weights: torch.Tensor,  # [T]
    ) -> torch.Tensor:  # [T, H]
        self._check_inputs(hidden, expert_ids, weights)
        start = time.monotonic()
        device = hidden.device
        if device.type != "cpu":
            # One device-to-host copy each, into pinned memory (torch's caching host allocator
            # reuses it); the calls below then slice host tensors, and the combined result
            # goes back in one host-to-device copy.
            hidden, weights = pinned_host_copy(hidden), pinned_host_copy(weights)
        out = torch.zeros(hidden.shape, dtype=hidden.dtype, device="cpu",
                          pin_memory=device.type != "cpu")
        # Plan on the CPU: a handful of small index ops that would each sync a GPU anyway.
        expert_ids = expert_ids.to("cpu")
        pending = (expert_ids != self.num_experts).nonzero().squeeze(1)  # token rows to send
        self.stats.dispatches += 1
        self.stats.rows_skipped += hidden.shape[0] - pending.numel()
        attempt = _Attempt()
        while pending.numel():
            placement = self._refresh()
            plan, unplaced = self._plan(layer, placement, pending, expert_ids)
            results = await asyncio.gather(*(
                self._calls.call(address, layer, hidden, expert_ids, weights, rows,
                                 placement.version)
                for address, rows in plan.items()))
            retry = [unplaced]
            for rows, result in zip(plan.values(), results, strict=True):
                if isinstance(result, torch.Tensor):
                    out.index_copy_(0, rows, result)
                else:
                    self._on_failure(layer, result, rows, expert_ids, attempt)
                    retry.append(rows)
            pending = torch.cat(retry)
            if pending.numel():
                left = self._wait_left(layer, placement, attempt, expert_ids[pending])
                if not plan:  # nothing could be sent: give the map (or a back-off) time
                    pause = min(self.poll_interval_s, left)
                    self.stats.replica_waits += 1
                    self.stats.wait_s += pause
                    await asyncio.sleep(pause)
        self.stats.layer_latency.setdefault(layer, LayerLatency()).add(time.monotonic() - start)
        return out if device.type == "cpu" else out.to(device, non_blocking=True)

    def _check_inputs(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: expected [T, H], got {list(hidden.shape)}")
        if hidden.dtype not in WIRE_DTYPES.values():
            raise ValueError(f"hidden: dtype {hidden.dtype} cannot be sent")
        tokens = hidden.shape[0]
        if tuple(expert_ids.shape) != (tokens,) or expert_ids.dtype != torch.int64:
            raise ValueError(f"expert_ids: expected int64 [{tokens}], got {expert_ids.dtype} "
                             f"{list(expert_ids.shape)}")
        if tuple(weights.shape) != (tokens,):
            raise ValueError(f"weights: expected [{tokens}], got {list(weights.shape)}")
        if tokens and not 0 <= int(expert_ids.min()) <= int(expert_ids.max()) <= self.num_experts:
            raise ValueError(f"expert_ids: values must lie in [0, {self.num_experts}]")

    def _refresh(self) -> PlacementMap:
        placement = self.placement_source()
        if placement.num_experts != self.num_experts:
            raise ValueError(f"placement: num_experts {placement.num_experts} differs from the "
                             f"router's {self.num_experts}")
        old = self._placement
        if old is not None and placement.version < old.version:
            return old  # versions only grow: an older map is never routed by again
        if old is None or placement.version > old.version:
            self._placement = placement
            self.stats.map_versions_seen += 1
            self._channels.retain(placement.addresses.values())
            self._channels.shard_of = {a: s for s, a in placement.addresses.items()}
        return placement

    def _plan(
        self, layer: int, placement: PlacementMap, pending: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows per chosen address (`dispatch_plan.plan_rows`), and the rows of experts with no
        usable replica right now."""
        now = time.monotonic()

        def copies_of(expert: int) -> list[str]:
            return [a for a in (placement.addresses[s] for s in placement.shards_for(layer, expert))
                    if self._channels.usable(a, now)]

        return plan_rows(pending, expert_ids, copies_of, self._channels.load, self._turns)

    def _on_failure(self, layer: int, failure: ShardFailure, rows: torch.Tensor,
                    expert_ids: torch.Tensor, attempt: _Attempt) -> None:
        experts = sorted(set(expert_ids[rows].tolist()))
        message = f"{failure.address}: {failure.code.name}: {failure.details}"
        self.stats.failed_calls += 1
        if failure.code in _FATAL:
            raise ExpertShardError(f"layer {layer} experts {experts}: {message}")
        self.stats.retries += 1
        self.stats.rows_retried += rows.numel()
        attempt.last_error = message
        self._channels.failed(failure.address)
        if failure.code in _UNREACHABLE:
            return  # bounded by the wait for a replica, not by max_retries
        attempt.failures += 1
        if attempt.failures > self.max_retries:
            raise ExpertShardError(
                f"layer {layer} experts {experts}: {attempt.failures} failed calls "
                f"(max_retries={self.max_retries}); last: {message}")

    def _wait_left(self, layer: int, placement: PlacementMap, attempt: _Attempt,
                   ids: torch.Tensor) -> float:
        """Seconds left to wait for a replica (the clock starts at the first trouble); raises
        once the bound is spent."""
        now = time.monotonic()
        if attempt.wait_started is None:
            attempt.wait_started = now
        waited = now - attempt.wait_started
        if waited >= self.wait_for_replica_s:
            raise NoExpertReplicaError(layer, sorted(set(ids.tolist())), waited,
                                       placement.version, attempt.last_error)
        return self.wait_for_replica_s - waited

    def latency_histogram(self) -> LatencyHistogram:
        """The per-shard round-trip histogram (for the worker's report)."""
        return self._channels.latency.histogram()

    async def close(self) -> None:
        """Close the channels (on the router's loop); the router is not used afterwards."""
        await self._channels.close()


__all__ = ["ExpertDispatchError", "ExpertShardError", "NoExpertReplicaError", "TokenRouter"]
