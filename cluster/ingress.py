"""The ingress deployment: OpenAI-compatible REST (through Serve's HTTP proxy) and the public
gRPC API (its own server, on `grpc_port`), both over the same `ClusterEngineClient`."""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from zayaserve.cluster.config import ClusterConfig
from zayaserve.cluster.control.admin_auth import load_admin_keys
from zayaserve.cluster.frontend.api_keys import load_api_keys
from zayaserve.cluster.frontend.engine_client import ClusterEngineClient
from zayaserve.cluster.frontend.metrics import MetricsCollector
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.tokenizer import Tokenizer
from zayaserve.replicas.observability import genai_metrics
from zayaserve.replicas.observability.tracing import configure as configure_tracing
from zayaserve.replicas.observability.tracing import flush as flush_traces
from zayaserve.replicas.rsa.serving import RSALimits, rsa_limits

log = logging.getLogger("zayaserve.ingress")


@serve.deployment(max_ongoing_requests=2000)
@serve.ingress()
class Ingress:
    # Serve awaits async constructors (mypy insists __init__ returns None).
    async def __init__(  # type: ignore[misc]
        self, workers: Any, controller: Any, shards: Any, config: dict[str, Any]
    ) -> None:
        self.config = ClusterConfig.create(**config)
        configure_tracing(self.config.tracing, "ingress")
        genai_metrics.configure(self.config.tracing, "ingress")
        key = self.config.api_key
        # Keys from the config, the key file and $ZAYASERVE_API_KEY, read here (in the pod
        # that serves), never passed around.
        self.api_keys = load_api_keys(key.get_secret_value() if key else None,
                                      self.config.api_key_file)
        admin = self.config.admin_api_key
        self.admin_keys = load_admin_keys(admin.get_secret_value() if admin else None,
                                          self.config.admin_api_key_file, self.api_keys)
        self.shards = shards
        tokenizer = Tokenizer.from_pretrained(resolve_model(self.config.model))
        info = await workers.describe.remote()
        self.client = ClusterEngineClient(
            workers, controller, tokenizer, self.config.model_name, info["max_model_len"],
            self.config.migration_limit, serve.get_replica_context().replica_id.unique_id)
        # One registry for REST and gRPC: /metrics counts the requests of both.
        self.metrics = MetricsCollector()
        self.grpc_server = None
        if self.config.grpc_port:
            from zayaserve.cluster.frontend.grpc_server import start_grpc_server

            self.grpc_server = await start_grpc_server(
                self.client, self.config.grpc_port, host=self.config.http_host,
                api_keys=self.api_keys, metrics=self.metrics,
                max_message_bytes=self.config.grpc_max_message_bytes,
                max_concurrent_rpcs=self.config.grpc_max_concurrent_rpcs,
                tls_cert_file=self.config.grpc_tls_cert_file,
                tls_key_file=self.config.grpc_tls_key_file,
                rsa_limits=self._rsa_limits(),
                max_response_logprobs=self.config.max_response_logprobs)

    def _rsa_limits(self) -> RSALimits:
        return rsa_limits(self.config.engine.limits)

    def __serve_build_asgi_app__(self) -> Any:
        from zayaserve.cluster.frontend.openai_api import build_openai_app

        return build_openai_app(self.client, api_keys=self.api_keys,
                                metrics_need_key=self.config.metrics_require_api_key,
                                strict_fields=self.config.strict_request_fields,
                                reasoning_parser=self.config.reasoning_parser,
                                tool_call_parser=self.config.tool_call_parser,
                                served_model_names=[self.config.model_name],
                                metrics=self.metrics,
                                max_prompts=self.config.engine.limits.max_prompts_per_request,
                                rsa_limits=self._rsa_limits(),
                                admin_api_keys=self.admin_keys,
                                max_response_logprobs=self.config.max_response_logprobs)

    async def __del__(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)
        flush_traces()
