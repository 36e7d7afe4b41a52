"""`zayaserve serve`: deploy the cluster on Ray Serve and stay in the foreground.

Without RAY_ADDRESS it starts an embedded local Ray; Ctrl-C or SIGTERM shuts down cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any

from zayaserve.cluster.config import ClusterConfig

APP_NAME = "zayaserve"


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model on Ray Serve (REST + gRPC)")
    p.add_argument("--model", default=None, help="checkpoint folder, or 'tiny' / 'small'")
    p.add_argument("--config", default=None, help="ClusterConfig YAML; flags override it")
    p.add_argument("--attention-workers", type=int, default=None)
    p.add_argument("--expert-shards", type=int, default=None)
    p.add_argument("--expert-replication", type=int, default=None)
    p.add_argument("--http-host", default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--redis-url", default=None, help="shared L2 prefix cache (redis://...)")
    p.add_argument("--kv-cache-encoding", default=None, choices=["none", "int8", "fp8"])
    p.add_argument("--no-overlap", action="store_true",
                   help="disable micro-batch overlap of attention and expert calls")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig.load(
        args.config, model=args.model, attention_workers=args.attention_workers,
        expert_shards=args.expert_shards, expert_replication=args.expert_replication,
        http_host=args.http_host, http_port=args.http_port, grpc_port=args.grpc_port,
        api_key=args.api_key, micro_batch_overlap=False if args.no_overlap else None,
        redis_url=args.redis_url, kv_cache_encoding=args.kv_cache_encoding)


def deploy(cfg: ClusterConfig) -> None:
    """Starts Serve on the connected Ray cluster and deploys the app (returns when ready)."""
    from ray import serve

    from zayaserve.cluster.app import build_app

    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    cfg = config_from_args(args)
    embedded = not os.environ.get("RAY_ADDRESS")
    if embedded:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=os.environ["RAY_ADDRESS"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(cfg)
        print(f"zayaserve: serving {cfg.model_name!r} "
              f"({cfg.attention_workers} attention worker(s), {cfg.expert_shards} expert "
              f"shard(s), replication {cfg.expert_replication})", flush=True)
        print(f"  REST (OpenAI): http://{cfg.http_host}:{cfg.http_port}/v1", flush=True)
        if cfg.grpc_port:
            print(f"  gRPC:          {cfg.http_host}:{cfg.grpc_port} "
                  "(zayaserve.v1.Generation)", flush=True)
        print("  Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        print("zayaserve: shutting down", flush=True)
        serve.delete(APP_NAME, _blocking=True)
        serve.shutdown()
        if embedded:
            ray.shutdown()
    return 0
