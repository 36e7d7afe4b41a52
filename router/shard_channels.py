"""The token router's connections to expert shards: one channel per address, reused, with the
rows in flight and a back-off per address that recently failed, and the deployment's RPC token
sent on every call (`call_metadata`). Dispatches go on one persistent stream per address
(`shard_stream`), or as unary calls (traced dispatches, which carry their trace context)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from zayaserve.replicas.observability.dispatch_tracing import trace_metadata
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.router_stats import ShardLatency
from zayaserve.router.shard_stream import ShardStream
from zayaserve.router.tensor_codec import MAX_MESSAGE_BYTES

AUTH_HEADER = "authorization"  # what router.shard_server checks
# gRPC's default reconnect backoff grows to 120 s; a shard restarted on the same port must be
# found within the router's wait, not minutes later.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# A failing address is skipped for 50 ms, doubling per further failure up to 1 s: other replicas
# take its rows meanwhile, and a dead one costs one refused connection per probe, not a storm.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


@dataclass(slots=True)
class _Cooldown:
    failures: int
    retry_at: float  # time.monotonic() after which the address may be probed again


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of a channel to a shard: the shards' message cap both ways, quick reconnects."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes), *_RECONNECT_OPTIONS]


CHANNEL_OPTIONS = channel_options()


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata that authenticates a call to a shard (None: no token, nothing to send)."""
    return None if token is None else ((AUTH_HEADER, f"Bearer {token}"),)


class ShardChannels:
    """Channels and per-address state, owned by one asyncio loop (grpc.aio channels are bound to
    the loop that made them). `metadata` goes with every call; calls and answers are capped at
    `max_message_bytes`, as the shards cap them."""

    def __init__(self, close_grace_s: float, *, token: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.close_grace_s = close_grace_s
        self.max_message_bytes = max_message_bytes
        self.metadata = call_metadata(token)
        self._options = channel_options(max_message_bytes)
        self._stubs: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._streams: dict[str, ShardStream] = {}
        self._in_flight: defaultdict[str, int] = defaultdict(int)  # address -> rows
        self._cooling: dict[str, _Cooldown] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.latency = ShardLatency()  # round trips of answered calls, per shard id
        self.shard_of: dict[str, str] = {}  # address -> shard id (the router keeps it current)

    def stub(self, address: str) -> Any:
        """The ExpertShard stub for an address; the channel connects lazily, on first call."""
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._stubs[address] = (channel, expert_pb2_grpc.ExpertShardStub(channel))
        return self._stubs[address][1]

    async def dispatch(self, address: str, request: expert_pb2.DispatchRequest,
                       timeout: float) -> expert_pb2.DispatchResponse:
        """One Dispatch to `address`, with the token; raises what the stub raises."""
        traced = trace_metadata()  # W3C context of a traced dispatch (else empty)
        metadata = self.metadata if not traced else (*(self.metadata or ()), *traced)
        start = time.monotonic()
        reply: expert_pb2.DispatchResponse = await self.stub(address).Dispatch(
            request, timeout=timeout, metadata=metadata)
        self.latency.observe(self.shard_of.get(address, address), time.monotonic() - start)
        return reply

    async def dispatch_stream(self, address: str, build: Callable[[int], bytes],
                              timeout: float) -> bytes:
        """One message on `address`'s dispatch stream (opened on first use, with the token);
        raises `StreamCallError`."""
        stream = self._streams.get(address)
        if stream is None:
            self.stub(address)
            stream = self._streams[address] = ShardStream(self._stubs[address][0],
                                                          self.metadata)
        start = time.monotonic()
        answer = await stream.request(build, timeout)
        self.latency.observe(self.shard_of.get(address, address), time.monotonic() - start)
        return answer

    def usable(self, address: str, now: float) -> bool:
        cooldown = self._cooling.get(address)
        return cooldown is None or cooldown.retry_at <= now

    def load(self, address: str) -> int:
        return self._in_flight[address]

    def add_in_flight(self, address: str, rows: int) -> None:
        self._in_flight[address] += rows

    def succeeded(self, address: str) -> None:
        self._cooling.pop(address, None)

    def failed(self, address: str) -> None:
        previous = self._cooling.get(address)
        failures = 1 if previous is None else previous.failures + 1
        backoff = min(BACKOFF_FIRST_S * 2 ** (failures - 1), BACKOFF_MAX_S)
        self._cooling[address] = _Cooldown(failures, time.monotonic() + backoff)

    def retain(self, addresses: Iterable[str]) -> None:
        """Close channels to addresses no longer in the placement map."""
        keep = set(addresses)
        for address in [a for a in self._stubs if a not in keep]:
            self._forget(address)

    def _forget(self, address: str) -> None:
        stream = self._streams.pop(address, None)
        if stream is not None:
            stream.close()
        channel, _ = self._stubs.pop(address)
        self._cooling.pop(address, None)
        # Calls still in flight on it may finish (grace) without holding up the caller.
        task = asyncio.ensure_future(channel.close(grace=self.close_grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for address in list(self._stubs):
            self._forget(address)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


__all__ = ["AUTH_HEADER", "CHANNEL_OPTIONS", "ShardChannels", "call_metadata",
           "channel_options"]
