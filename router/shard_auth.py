"""The shard port's guard: every call must carry the deployment's RPC token, checked before
its request is read; grpc.health.v1's Check stays open for probes."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2

from zayaserve.router.shard_channels import AUTH_HEADER

_OPEN_METHOD = f"/{grpc_health.SERVICE_NAME}/Check"  # probes need no token (Watch does)
UNAUTHENTICATED_DETAILS = "missing or invalid shard RPC token"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call whose metadata lacks `authorization: Bearer <token>` with UNAUTHENTICATED,
    before its request is read (a stream-unary handler runs before any message arrives), so a
    stalled or huge request holds no slot of the concurrency cap. The token is compared in
    constant time and never echoed.

    grpc.health.v1's Check stays open for probes, answered the same way, unread: SERVING, as
    every service here is while the server answers (the token gets the full health service)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token: must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._deny = grpc.stream_unary_rpc_method_handler(_deny_unauthenticated)
        self._open_check = grpc.stream_unary_rpc_method_handler(
            _serving, response_serializer=health_pb2.HealthCheckResponse.SerializeToString)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        details = handler_call_details
        if self.allows(details.invocation_metadata):
            return await continuation(details)
        if details.method == _OPEN_METHOD:
            return self._open_check
        return self._deny

    def allows(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        given = [v for k, v in metadata or () if k == AUTH_HEADER]
        if len(given) != 1:
            return False
        value = given[0]
        try:
            raw = value if isinstance(value, bytes) else value.encode()
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(raw, self._expected)


async def _deny_unauthenticated(requests: Any, context: grpc.aio.ServicerContext) -> NoReturn:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
    raise AssertionError("unreachable: context.abort raises")


async def _serving(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
