"""The expert shard's gRPC face: decode routed rows, compute the experts held here, send back.

The tensor math is not here: the servicer takes a `compute(layer, hidden, expert_ids, weights)`
callable (the ExpertShard deployment passes `run_grouped` over its loaded `ExpertWeights`), so
router/ stays free of the model code.

In the cluster the port is guarded: every ExpertShard call must carry the deployment's RPC token
(`authorization: Bearer <token>`, checked by `TokenAuthInterceptor`; grpc.health.v1's Check
stays open for probes), calls beyond a concurrency cap get RESOURCE_EXHAUSTED, and messages are
capped at what one engine step can need (`dispatch_message_limit`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import grpc
import torch
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from zayaserve.replicas.observability.dispatch_tracing import ShardSpans, tracing_on
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.shard_auth import UNAUTHENTICATED_DETAILS, TokenAuthInterceptor
from zayaserve.router.shard_channels import AUTH_HEADER
from zayaserve.router.shard_stream_server import stream_handler
from zayaserve.router.tensor_codec import MAX_MESSAGE_BYTES, TensorCodecError, decode, encode

SERVICE_NAME = "zayaserve.expert.v1.ExpertShard"
# Per routed row: a hidden row and its weight as float32 (the widest float on the wire) and its
# expert id as a protobuf varint (at most 10 bytes). The response's out rows are no larger.
_FLOAT_BYTES, _ID_BYTES = 4, 10

# compute(layer, hidden [n, H], expert_ids [n] int64, weights [n]) -> [n, H]. It runs on a worker
# thread, may be called concurrently, must not write into its inputs (they alias request bytes),
# and is only ever given experts this shard holds.
ComputeFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The experts held: the same set for every layer, or one set per layer.
_Held = frozenset[int] | dict[int, frozenset[int]]


class Refusal(Exception):
    """A dispatch the shard refuses: the status and details its caller gets."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _held_in(held: _Held, layer: int) -> frozenset[int]:
    return held if isinstance(held, frozenset) else held.get(layer, frozenset())


class ExpertShardServicer(expert_pb2_grpc.ExpertShardServicer):
    """Serves `Dispatch` for the experts it holds and `Info` for the placement controller.

    Contract: a Dispatch naming any expert this shard does not hold in that layer (a stale
    placement map, or the skip class, which must never be sent) fails whole with
    FAILED_PRECONDITION naming the experts, so the router refreshes its map; malformed tensors
    fail with INVALID_ARGUMENT naming the field; a compute error is INTERNAL. Nothing is
    computed partially.
    """

    def __init__(
        self,
        shard_id: str,
        compute: ComputeFn,
        held: Mapping[int, Sequence[int]] | Sequence[int],
        expert_bytes: int,
        *,
        num_layers: int | None = None,
        address: str = "",
    ) -> None:
        self.shard_id = shard_id
        self.trace_spans = ShardSpans(shard_id)  # spans of traced calls (tracing on only)
        self.address = address  # filled in by serve_shard when left empty
        self.num_layers = (len(held) if isinstance(held, Mapping) else 0) \
            if num_layers is None else num_layers
        self.set_holding(held, compute, expert_bytes)
        self.tokens_served: Counter[tuple[int, int]] = Counter()  # (layer, expert) -> rows
        self.requests = 0
        self.rows_in_flight = 0
        self.calls_in_flight = 0
        self.max_concurrent_calls: int | None = None  # set by serve_shard
        self.max_placement_version = 0

    def set_holding(self, held: Mapping[int, Sequence[int]] | Sequence[int],
                    compute: ComputeFn, expert_bytes: int) -> None:
        """Swap what this shard serves (experts and the compute over their weights) in one
        assignment: a Dispatch reads both from the same snapshot, so a call checked against the
        old experts is computed with the old weights."""
        if isinstance(held, Mapping):
            by_layer: _Held = {int(k): frozenset(map(int, v)) for k, v in held.items()}
        else:
            by_layer = frozenset(map(int, held))
        self._holding = (by_layer, compute)
        self.expert_bytes = expert_bytes

    def held_experts(self, layer: int) -> frozenset[int]:
        return _held_in(self._holding[0], layer)

    @property
    def rows_served(self) -> int:
        return sum(self.tokens_served.values())

    async def Dispatch(  # noqa: N802 - gRPC method name
        self, request: expert_pb2.DispatchRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.DispatchResponse:
        if not tracing_on():
            return await self._dispatch(request, context)
        with self.trace_spans.call(context.invocation_metadata(), request.layer,
                                   len(request.expert_ids)):
            return await self._dispatch(request, context)

    async def _dispatch(
        self, request: expert_pb2.DispatchRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.DispatchResponse:
        try:
            hidden = decode(request.hidden, "hidden", expect_ndim=2)  # [n, H]
            weights = decode(request.weights, "weights", expect_ndim=1)  # [n]
            expert_ids = torch.tensor(list(request.expert_ids), dtype=torch.int64)  # [n]
            out = await self.serve_rows(request.layer, hidden, expert_ids, weights,
                                        request.placement_version)
        except TensorCodecError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Refusal as r:
            await _abort(context, r.code, r.details)
        return expert_pb2.DispatchResponse(out=encode(out, "out"), shard_id=self.shard_id)

    async def serve_rows(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                         weights: torch.Tensor, placement_version: int) -> torch.Tensor:
        """One layer's rows, checked and computed (a unary call's or a stream message's);
        raises `Refusal` with the status the caller gets."""
        if self.num_layers and layer >= self.num_layers:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"layer: {layer} out of range, shard {self.shard_id} has "
                          f"{self.num_layers} layers")
        n = hidden.shape[0]
        if expert_ids.numel() != n or weights.numel() != n:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                          f"expert_ids/weights: {expert_ids.numel()} ids and {weights.numel()} "
                          f"weights for {n} hidden rows")
        cap = self.max_concurrent_calls
        if cap is not None and self.calls_in_flight >= cap:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"shard {self.shard_id} is busy: {cap} calls in flight")
        self.calls_in_flight += 1
        try:
            return await self._serve(layer, hidden, expert_ids, weights, placement_version)
        finally:
            self.calls_in_flight -= 1

    async def _serve(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                     weights: torch.Tensor, placement_version: int) -> torch.Tensor:
        n = hidden.shape[0]
        present, counts = torch.unique(expert_ids, return_counts=True)
        held_map, compute = self._holding  # one snapshot for the check and the compute
        held = _held_in(held_map, layer)
        foreign = [e for e in present.tolist() if e not in held]
        if foreign:
            raise Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                          f"expert_ids: shard {self.shard_id} does not hold experts {foreign} of "
                          f"layer {layer} (holds {sorted(held)})")
        self.max_placement_version = max(self.max_placement_version, placement_version)
        if n == 0:
            out = hidden.new_zeros(hidden.shape)
        else:
            try:
                # Off the event loop: other requests (and health checks) keep being served.
                self.rows_in_flight += n
                out = await asyncio.to_thread(compute, layer, hidden, expert_ids, weights)
            except Exception as e:  # the shard stays up; the caller sees why
                raise Refusal(grpc.StatusCode.INTERNAL,
                              f"shard {self.shard_id} layer {layer}: {type(e).__name__}: {e}"
                              ) from None
            finally:
                self.rows_in_flight -= n
        if tuple(out.shape) != tuple(hidden.shape):
            raise Refusal(grpc.StatusCode.INTERNAL,
                          f"shard {self.shard_id}: compute returned {list(out.shape)} for "
                          f"{list(hidden.shape)}")
        self.requests += 1
        for expert, count in zip(present.tolist(), counts.tolist(), strict=True):
            self.tokens_served[(layer, expert)] += count
        return out

    async def Info(  # noqa: N802 - gRPC method name
        self, request: expert_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> expert_pb2.ShardInfo:
        info = expert_pb2.ShardInfo(
            shard_id=self.shard_id, address=self.address, num_layers=self.num_layers,
            expert_bytes=self.expert_bytes, pid=os.getpid())
        held = self._holding[0]
        if isinstance(held, frozenset):
            info.experts.extend(sorted(held))
        else:
            for layer, experts in held.items():
                info.per_layer[layer].experts.extend(sorted(experts))
        for (layer, expert), tokens in sorted(self.tokens_served.items()):
            info.tokens_served.add(layer=layer, expert=expert, tokens=tokens)
        return info


def dispatch_message_limit(max_rows: int, hidden_size: int) -> int:
    """The largest Dispatch request or response carrying `max_rows` rows of width `hidden_size`
    (float32 at most), plus 25% and 1 MiB of headroom (framing, the other fields, Info)."""
    if min(max_rows, hidden_size) < 1:
        raise ValueError("max_rows/hidden_size: must be >= 1")
    payload = max_rows * (hidden_size * _FLOAT_BYTES + _FLOAT_BYTES + _ID_BYTES)
    return payload + payload // 4 + 2**20


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve_shard(
    servicer: ExpertShardServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    advertise_host: str | None = None,
    token: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server with the shard and grpc.health.v1 on it; returns (server, bound port).

    Port 0 binds a free port; the cluster binds the node's address, never a wildcard. The
    servicer's `address` (reported by Info) becomes `advertise_host:port`, by default the bind
    host or, for a wildcard bind, this machine's name. With a `token`, every call but a health
    Check needs it (UNAUTHENTICATED); without one (in-process tests) nothing is checked. Over
    `max_message_bytes` messages and dispatches beyond `max_concurrent_rpcs` at once (None: no
    cap), unary calls and stream messages alike, get RESOURCE_EXHAUSTED. The cap counts work
    in flight, not open streams (each worker keeps one open per shard); gRPC itself refuses
    RPCs past twice the cap plus 8, a backstop. Stop it with `await server.stop(grace)`.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # port 0 must give a port nobody else holds
        ],
        interceptors=None if token is None else [TokenAuthInterceptor(token)],
        maximum_concurrent_rpcs=None if max_concurrent_rpcs is None
        else 2 * max_concurrent_rpcs + 8)
    servicer.max_concurrent_calls = max_concurrent_rpcs
    expert_pb2_grpc.add_ExpertShardServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((stream_handler(servicer),))
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(_host_port(host, port))
    if bound == 0:
        raise OSError(f"port: cannot bind {_host_port(host, port)}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    if not servicer.address:
        wildcard = host in ("", "0.0.0.0", "::", "[::]")
        servicer.address = _host_port(
            advertise_host or (socket.gethostname() if wildcard else host), bound)
    return server, bound


__all__ = ["AUTH_HEADER", "SERVICE_NAME", "Refusal", "UNAUTHENTICATED_DETAILS",
           "ComputeFn", "ExpertShardServicer", "TokenAuthInterceptor", "dispatch_message_limit",
           "serve_shard"]
