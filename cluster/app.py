"""The Serve application: `build_app(args)` for `serve run zayaserve.cluster.app:build_app
model=tiny expert_shards=2 engine.block_size=8`, `serve deploy` and a KubeRay `serveConfigV2`
(args become ClusterConfig fields, engine settings nested as `engine: {...}` in YAML or dotted
on the command line; errors name the field)."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from zayaserve.cluster.config import ClusterConfig
from zayaserve.cluster.ingress import Ingress
from zayaserve.cluster.placement_controller import PlacementController
from zayaserve.replicas.attention_worker import AttentionWorker
from zayaserve.replicas.expert_shard import ExpertShard
from zayaserve.replicas.model.checkpoint_paths import resolve_model
from zayaserve.replicas.model.config import ZayaConfig

# Serve imports the request router class by its dotted path.
REQUEST_ROUTER = "zayaserve.router.request_router.PrefixAwareRequestRouter"


def build_app(args: dict[str, Any] | ClusterConfig) -> Application:
    cfg = args if isinstance(args, ClusterConfig) else ClusterConfig.create(**args)
    num_experts = ZayaConfig.from_pretrained(resolve_model(cfg.model)).num_experts
    actor = {"num_cpus": cfg.replica_num_cpus}
    # Serve's decorator turns the classes into Deployments (mypy sees the plain classes).
    # The controller places experts on shards and sums every worker's stats (it exists with
    # experts in-process too, so /metrics counts all workers, not one picked at random).
    controller = PlacementController.options(  # type: ignore[attr-defined]
        ray_actor_options=actor,
    ).bind(num_experts, cfg.expert_shards, cfg.expert_replication)
    shards = None
    if cfg.expert_shards:
        shards = ExpertShard.options(  # type: ignore[attr-defined]
            num_replicas=cfg.expert_shards,
            ray_actor_options={**actor, "num_gpus": cfg.expert_num_gpus},
        ).bind(controller, cfg.model, cfg.engine.dtype, cfg.engine.num_threads,
               _device_for(cfg.engine.device, cfg.expert_num_gpus))
    engine = cfg.engine.model_copy(
        update={"device": _device_for(cfg.engine.device, cfg.attention_num_gpus)})
    router = RequestRouterConfig(
        request_router_class=REQUEST_ROUTER,  # type: ignore
        request_router_kwargs={"block_size": cfg.engine.block_size,
                               "imbalanced_threshold": cfg.routing_imbalance_threshold})
    workers = AttentionWorker.options(  # type: ignore[attr-defined]
        num_replicas=cfg.attention_workers,
        ray_actor_options={**actor, "num_gpus": cfg.attention_num_gpus},
        max_ongoing_requests=cfg.max_pending_requests + 8, request_router_config=router,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(controller, cfg.model, engine, cfg.max_pending_requests,
           cfg.dispatch_deadline_s, cfg.wait_for_replica_s, bool(cfg.expert_shards))
    return Ingress.options(  # type: ignore[attr-defined]
        ray_actor_options=actor,
    ).bind(workers, controller, shards, cfg.model_dump())


def _device_for(device: str, num_gpus: float) -> str:
    """A replica given no GPU runs on the CPU even on a GPU node (`auto` would otherwise find
    the node's GPUs if Ray left them visible); one given a GPU keeps the setting."""
    return "cpu" if device == "auto" and num_gpus == 0 else device
