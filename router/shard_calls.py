"""One shard's share of a dispatch: its rows as a message on the shard's dispatch stream
(`shard_stream`, the default) or as a unary `Dispatch` call (traced dispatches, which carry their
trace context per call; or `stream=False`), checked on the way back. A call never raises for a
shard's fault: it returns a `ShardFailure` that the token router retries or reports."""

from __future__ import annotations

from typing import NamedTuple

import grpc
import torch

from zayaserve.replicas.observability.dispatch_tracing import trace_metadata
from zayaserve.router.protos import expert_pb2
from zayaserve.router.router_stats import RouterStats
from zayaserve.router.shard_channels import ShardChannels
from zayaserve.router.shard_stream import StreamCallError
from zayaserve.router.stream_wire import WireError, decode_answer, encode_rows
from zayaserve.router.tensor_codec import decode, encode


class ShardFailure(NamedTuple):
    address: str
    code: grpc.StatusCode
    details: str


class ShardCalls:
    def __init__(self, channels: ShardChannels, stats: RouterStats, deadline_s: float,
                 stream: bool) -> None:
        self._channels, self.stats = channels, stats
        self.deadline_s, self.stream = deadline_s, stream

    async def call(
        self, address: str, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
        weights: torch.Tensor, rows: torch.Tensor, version: int,
    ) -> torch.Tensor | ShardFailure:
        n = rows.numel()
        if self.stream and not trace_metadata():
            return await self._stream_call(address, layer, hidden[rows], expert_ids[rows],
                                           weights[rows], version, hidden.shape[1])
        request = expert_pb2.DispatchRequest(
            layer=layer, hidden=encode(hidden[rows], "hidden"),
            expert_ids=expert_ids[rows].tolist(), weights=encode(weights[rows], "weights"),
            placement_version=version)
        size = request.ByteSize()
        if size > self._channels.max_message_bytes:  # the shard would refuse it: a config error
            return self._too_big(address, n, size)
        self._sent(n, size)
        self._channels.add_in_flight(address, n)
        try:
            reply = await self._channels.dispatch(address, request, self.deadline_s)
        except grpc.aio.AioRpcError as e:
            return ShardFailure(address, e.code(), e.details() or "")
        except grpc.aio.UsageError as e:  # the channel was closed under us by a map change
            return ShardFailure(address, grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self._channels.add_in_flight(address, -n)
        self.stats.bytes_received += reply.ByteSize()
        self._channels.succeeded(address)
        try:
            out = decode(reply.out, "out", expect_dtype=hidden.dtype, expect_ndim=2)
        except ValueError as e:
            return ShardFailure(address, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return self._checked(address, out, n, hidden.shape[1])

    async def _stream_call(self, address: str, layer: int, hidden: torch.Tensor,
                           expert_ids: torch.Tensor, weights: torch.Tensor, version: int,
                           width: int) -> torch.Tensor | ShardFailure:
        """The rows as one message on the shard's dispatch stream (`shard_stream`)."""
        n = hidden.shape[0]
        payload = encode_rows(0, layer, hidden, expert_ids, weights, version)
        if len(payload) > self._channels.max_message_bytes:
            return self._too_big(address, n, len(payload))
        self._sent(n, len(payload))

        def build(call_id: int) -> bytes:  # the call id goes in the header's first 8 bytes
            return call_id.to_bytes(8, "little") + payload[8:]

        self._channels.add_in_flight(address, n)
        try:
            data = await self._channels.dispatch_stream(address, build, self.deadline_s)
        except StreamCallError as e:
            return ShardFailure(address, e.code, e.details)
        finally:
            self._channels.add_in_flight(address, -n)
        self.stats.bytes_received += len(data)
        try:
            answer = decode_answer(data)
        except WireError as e:
            return ShardFailure(address, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if answer.out is None:  # refused in-band: the stream goes on
            return ShardFailure(address, answer.status, answer.details)
        self._channels.succeeded(address)
        if answer.out.dtype != hidden.dtype:
            return ShardFailure(address, grpc.StatusCode.INVALID_ARGUMENT,
                            f"out.dtype: expected {hidden.dtype}, got {answer.out.dtype}")
        return self._checked(address, answer.out, n, width)

    def _too_big(self, address: str, n: int, size: int) -> ShardFailure:
        return ShardFailure(address, grpc.StatusCode.INVALID_ARGUMENT, f"{n} rows: {size} bytes, "
                        f"over shard_max_message_bytes={self._channels.max_message_bytes}")

    def _sent(self, n: int, size: int) -> None:
        self.stats.calls += 1
        self.stats.rows_sent += n
        self.stats.bytes_sent += size

    @staticmethod
    def _checked(address: str, out: torch.Tensor, n: int,
                 width: int) -> torch.Tensor | ShardFailure:
        if tuple(out.shape) != (n, width):
            return ShardFailure(address, grpc.StatusCode.INVALID_ARGUMENT,
                            f"out: shape {list(out.shape)} for {n} rows")
        return out
