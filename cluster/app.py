"""The Serve application: `build_app(args)` for `serve run zayaserve.cluster.app:build_app
model=tiny expert_shards=2 engine.block_size=8`, `serve deploy` and a KubeRay `serveConfigV2`
(args become ClusterConfig fields, engine settings nested as `engine: {...}` in YAML or dotted
on the command line; errors name the field).

The expert shards' gRPC port is guarded by an RPC token made here, once per build, and handed
to the shards and the attention workers in their bind arguments only (never a CLI argument or a
config field, never logged)."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from pydantic import SecretStr
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from zayaserve.cluster.config import ClusterConfig
from zayaserve.cluster.control.elastic_config import pool_bounds
from zayaserve.cluster.control.placement_controller import PlacementController
from zayaserve.cluster.control.serve_autoscaling import serve_autoscaling_config
from zayaserve.cluster.ingress import Ingress
from zayaserve.replicas.attention_worker import AttentionWorker
from zayaserve.replicas.cluster_messages import SHARD_METRIC, WORKER_METRIC
from zayaserve.replicas.expert_shard import ExpertShard
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig
from zayaserve.router.shard_server import dispatch_message_limit

# Serve imports the request router class by its dotted path.
REQUEST_ROUTER = "zayaserve.replicas.serve_request_router.PrefixAwareRequestRouter"


def build_app(args: dict[str, Any] | ClusterConfig) -> Application:
    cfg = args if isinstance(args, ClusterConfig) else ClusterConfig.create(**args)
    # OTEL_* variables are read here, where the application is built, so every replica
    # traces alike whatever its own environment.
    cfg = cfg.model_copy(update={"tracing": cfg.tracing.resolved()})
    tracing = cfg.tracing.model_dump()
    model = ZayaConfig.from_pretrained(resolve_model(cfg.model))
    num_experts = model.num_experts
    # Stable across rollouts when the operator sets it; else new per build (a rolling update
    # then refuses old-new pairs until it completes).
    rpc_token = os.environ.get("ZAYASERVE_RPC_TOKEN") or secrets.token_urlsafe(32)
    # One engine step sends at most max_num_batched_tokens rows to a shard in one call.
    message_bytes = cfg.shard_max_message_bytes or dispatch_message_limit(
        cfg.engine.max_num_batched_tokens, model.hidden_size)
    actor: dict[str, Any] = {"num_cpus": cfg.replica_num_cpus}
    # Pinned by a custom resource (the head node on Kubernetes): no CPU asked for, so a head
    # that offers Ray no CPUs (keeping workers and shards off it) still takes them.
    front = ({"num_cpus": 0, "resources": dict(cfg.ingress_ray_resources)}
             if cfg.ingress_ray_resources else actor)
    shard_bounds, worker_bounds = pool_bounds(cfg.autoscaling, cfg.attention_workers,
                                              cfg.expert_shards, cfg.expert_replication)
    # Serve's decorator turns the classes into Deployments (mypy sees the plain classes).
    # The controller places experts on shards and sums every worker's stats (it exists with
    # experts in-process too, so /metrics counts all workers, not one picked at random).
    controller = PlacementController.options(  # type: ignore[attr-defined]
        ray_actor_options=front,
    ).bind(num_experts, cfg.expert_shards, cfg.expert_replication, cfg.attention_workers,
           cfg.autoscaling.model_dump(), cfg.eplb.model_dump(), tracing, cfg.scale_cooldown_s,
           cfg.max_experts_per_shard)
    shards = None
    if cfg.expert_shards:
        shards = ExpertShard.options(  # type: ignore[attr-defined]
            autoscaling_config=serve_autoscaling_config(SHARD_METRIC, cfg.expert_shards,
                                                        shard_bounds),
            ray_actor_options={**actor, "num_gpus": cfg.expert_num_gpus,
                               "resources": dict(cfg.expert_ray_resources)},
        ).bind(controller, cfg.model, cfg.engine.dtype, cfg.engine.num_threads,
               _device_for(cfg.engine.device, cfg.expert_num_gpus), rpc_token=rpc_token,
               max_message_bytes=message_bytes,
               max_concurrent_calls=cfg.shard_max_concurrent_calls, tracing=tracing)
    engine = cfg.engine.model_copy(update={
        "device": _device_for(cfg.engine.device, cfg.attention_num_gpus),
        "kv_cache_secret": _cache_secret(cfg)})
    router = RequestRouterConfig(
        request_router_class=REQUEST_ROUTER,  # type: ignore
        request_router_kwargs={"block_size": cfg.engine.block_size,
                               "imbalanced_threshold": cfg.routing_imbalance_threshold},
        # The workers' RSA calls in flight (record_routing_stats) reach the router this often.
        request_routing_stats_period_s=1.0)  # type: ignore[arg-type]
    # Both deployments' counts follow the placement controller (serve_autoscaling), so a
    # resize changes them in place.
    workers = AttentionWorker.options(  # type: ignore[attr-defined]
        autoscaling_config=serve_autoscaling_config(WORKER_METRIC, cfg.attention_workers,
                                                    worker_bounds),
        ray_actor_options={**actor, "num_gpus": cfg.attention_num_gpus,
                           "resources": dict(cfg.attention_ray_resources)},
        max_ongoing_requests=cfg.max_pending_requests + 8, request_router_config=router,
        max_queued_requests=cfg.max_queued_requests,
        # A worker Serve removes drains: routed around at once, stopped when what it holds
        # has finished (or at drain_timeout_s).
        graceful_shutdown_timeout_s=cfg.drain_timeout_s, graceful_shutdown_wait_loop_s=1.0,
    ).bind(controller, cfg.model, engine, cfg.max_pending_requests,
           cfg.dispatch_deadline_s, cfg.wait_for_replica_s, bool(cfg.expert_shards),
           rpc_token=rpc_token, shard_max_message_bytes=message_bytes, tracing=tracing)
    return Ingress.options(  # type: ignore[attr-defined]
        ray_actor_options=front,
    ).bind(workers, controller, shards, cfg.model_dump())


def _cache_secret(cfg: ClusterConfig) -> SecretStr | None:
    """One L2 cache secret for every worker of this deployment: the configured one, else
    $ZAYASERVE_KV_CACHE_SECRET, else one generated here (entries then end with it)."""
    if not cfg.engine.kv_cache_redis_url:
        return cfg.engine.kv_cache_secret
    if cfg.engine.kv_cache_secret is not None:
        return cfg.engine.kv_cache_secret
    if os.environ.get("ZAYASERVE_KV_CACHE_SECRET"):
        return None  # each worker reads the same variable
    logging.getLogger("zayaserve.app").warning(
        "no kv_cache_secret or ZAYASERVE_KV_CACHE_SECRET: generated one for this deployment; "
        "L2 prefix-cache entries will not survive a redeploy")
    return SecretStr(secrets.token_hex(32))


def _device_for(device: str, num_gpus: float) -> str:
    """A replica given no GPU runs on the CPU even on a GPU node (`auto` would otherwise find
    the node's GPUs if Ray left them visible); one given a GPU keeps the setting."""
    return "cpu" if device == "auto" and num_gpus == 0 else device
