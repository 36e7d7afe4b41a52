"""The public gRPC server: Generation (grpc_api.py), grpc.health.v1 following the engine's
health, reflection, message-size and concurrency caps, and TLS when configured."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.grpc_api import SERVICE_NAME, GenerationServicer
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.cluster.frontend.response_budget import DEFAULT_MAX_RESPONSE_LOGPROBS
from zayaserve.cluster.protos import generation_pb2_grpc as pb_grpc
from zayaserve.replicas.rsa.serving import RSALimits

_HEALTH_TIMEOUT_S = 10.0
_HEALTH_WATCHERS: set[asyncio.Future[None]] = set()  # keeps the watcher tasks referenced


async def _watch_health(client: EngineClient, servicer: Any, period_s: float) -> None:
    """grpc.health.v1 tells the truth: SERVING only while the engine is live."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    current = None
    while True:
        try:
            await asyncio.wait_for(client.check_health(), _HEALTH_TIMEOUT_S)
            status = serving
        except Exception:
            status = not_serving
        if status != current:
            for service in ("", SERVICE_NAME):
                await servicer.set(service, status)
            current = status
        await asyncio.sleep(period_s)


async def start_grpc_server(
    client: EngineClient, port: int, host: str = "0.0.0.0", *,
    api_key: str | None = None, served_model_names: list[str] | None = None,
    api_keys: list[str] | None = None,
    metrics: MetricsCollector | None = None, max_message_bytes: int = 4 * 2**20,
    max_concurrent_rpcs: int = 1024, health_period_s: float = 1.0,
    tls_cert_file: str | None = None, tls_key_file: str | None = None,
    rsa_limits: RSALimits | None = None,
    max_response_logprobs: int = DEFAULT_MAX_RESPONSE_LOGPROBS,
) -> grpc.aio.Server:
    """Starts (and returns) a grpc.aio server with Generation, grpc.health.v1 (SERVING for ""
    and the Generation service while the engine is healthy, NOT_SERVING otherwise) and
    reflection. Messages over `max_message_bytes` are refused, and calls beyond
    `max_concurrent_rpcs` get RESOURCE_EXHAUSTED. With `tls_cert_file` and `tls_key_file`
    (PEM) it serves TLS only. Call from the event loop that will serve it; stop with
    `await server.stop(grace)`."""
    credentials = _tls_credentials(tls_cert_file, tls_key_file)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", max_message_bytes)],
        maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_GenerationServicer_to_server(
        GenerationServicer(client, api_key=api_key, api_keys=api_keys,
                           served_model_names=served_model_names, metrics=metrics,
                           rsa_limits=rsa_limits,
                           max_response_logprobs=max_response_logprobs), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials is not None
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"port: cannot bind the gRPC server to {host}:{port}")
    await server.start()
    watcher = asyncio.ensure_future(_watch_health(client, health_servicer, health_period_s))
    _HEALTH_WATCHERS.add(watcher)
    watcher.add_done_callback(_HEALTH_WATCHERS.discard)
    return server


def _tls_credentials(cert_file: str | None, key_file: str | None
                     ) -> grpc.ServerCredentials | None:
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ValueError("grpc_tls_cert_file and grpc_tls_key_file: give both or neither")
    try:
        cert, key = Path(cert_file).read_bytes(), Path(key_file).read_bytes()
    except OSError as err:
        raise ValueError(f"grpc_tls_cert_file/grpc_tls_key_file: cannot read "
                         f"({err.strerror or type(err).__name__}: {err.filename})") from None
    return grpc.ssl_server_credentials([(key, cert)])
