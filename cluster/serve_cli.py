"""`zayaserve serve`: deploy the cluster on Ray Serve and stay in the foreground.

Without RAY_ADDRESS it starts an embedded local Ray of its own (with the Ray dashboard, so Ray
Serve's `serve status` works against it, unless `--no-dashboard`); Ctrl-C or SIGTERM shuts down
cleanly. The terminal stays quiet: Ray and Serve log warnings and errors only, and the calls the
deployments make to each other (placement, heartbeats, stats) are never access-logged;
`--log-level info` brings Serve's own logs and access logs back.
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
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a model on Ray Serve (REST + gRPC)")
    p.add_argument("--model", default=None, help="checkpoint folder, or 'tiny' / 'small'")
    p.add_argument("--config", default=None, help="ClusterConfig YAML; flags override it")
    p.add_argument("--attention-workers", type=int, default=None)
    p.add_argument("--expert-shards", type=int, default=None)
    p.add_argument("--expert-replication", type=int, default=None)
    p.add_argument("--autoscale", action="store_true", default=None,
                   help="scale both deployments on load (autoscaling.enabled)")
    p.add_argument("--max-attention-workers", type=int, default=None,
                   help="autoscaling.attention_workers.max (also bounds zayaserve scale)")
    p.add_argument("--max-expert-shards", type=int, default=None,
                   help="autoscaling.expert_shards.max (also bounds zayaserve scale)")
    p.add_argument("--eplb", action="store_true", default=None,
                   help="replicate and re-place hot experts from their load (eplb.enabled)")
    p.add_argument("--redundant-experts", type=int, default=None,
                   help="eplb.redundant_experts: extra copies for the hottest experts")
    p.add_argument("--http-host", default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--api-key-file", default=None,
                   help="file of API keys, one per line (or set ZAYASERVE_API_KEY); keys are "
                        "never taken on the command line, where `ps` would show them")
    p.add_argument("--redis-url", default=None,
                   help="engine.kv_cache_redis_url: shared L2 prefix cache (redis://...)")
    p.add_argument("--kv-cache-encoding", default=None, choices=["none", "int8", "fp8"],
                   help="engine.kv_cache_encoding: how L2 stores K/V")
    p.add_argument("--device", default=None,
                   help="engine.device: auto (a GPU when the worker has one), cpu, cuda")
    p.add_argument("--no-overlap", action="store_true",
                   help="engine.micro_batches=1: no overlap of attention and expert calls")
    p.add_argument("--no-dashboard", action="store_true",
                   help="embedded Ray: start it without the dashboard (then `serve status` "
                        "cannot reach it)")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="embedded Ray: the dashboard's port (default 8265, what `serve status` "
                        "asks by default)")
    p.add_argument("--otlp-traces-endpoint", default=None,
                   help="send OpenTelemetry traces to this OTLP/gRPC collector (default: "
                        "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT; "
                        "neither: tracing off)")
    p.add_argument("--print-serve-config", action="store_true",
                   help="print the Ray Serve config (for `serve deploy`, KubeRay's "
                        "serveConfigV2) of these settings and exit; secrets are left out")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="Ray and Serve log level (default warning; info adds Serve's "
                        "per-call access logs)")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig.load(
        args.config, model=args.model, attention_workers=args.attention_workers,
        expert_shards=args.expert_shards, expert_replication=args.expert_replication,
        http_host=args.http_host, http_port=args.http_port, grpc_port=args.grpc_port,
        api_key_file=args.api_key_file,
        autoscaling={"enabled": args.autoscale,
                     "attention_workers": {"max": args.max_attention_workers},
                     "expert_shards": {"max": args.max_expert_shards}},
        eplb={"enabled": args.eplb, "redundant_experts": args.redundant_experts},
        tracing={"otlp_traces_endpoint": args.otlp_traces_endpoint},
        engine={"kv_cache_redis_url": args.redis_url,
                "kv_cache_encoding": args.kv_cache_encoding, "device": args.device,
                "micro_batches": 1 if args.no_overlap else None})


def serve_config(cfg: ClusterConfig, log_level: str = "warning") -> dict[str, Any]:
    """The Ray Serve config document (`serve deploy FILE`, KubeRay's serveConfigV2) running
    `build_app` with `cfg`'s non-default fields as args. Secrets are never written: API keys
    come from `api_key_file` or $ZAYASERVE_API_KEY, the L2 cache secret from
    $ZAYASERVE_KV_CACHE_SECRET."""
    args = cfg.model_dump(mode="json", exclude_defaults=True,
                          exclude={"api_key": True, "engine": {"kv_cache_secret"}})
    args = {"model": cfg.model, **args}
    logging_config = {"log_level": log_level.upper(),
                      "enable_access_log": log_level in ("debug", "info")}
    return {"proxy_location": "EveryNode",
            "http_options": {"host": cfg.http_host, "port": cfg.http_port},
            "logging_config": logging_config,
            "applications": [{"name": APP_NAME, "route_prefix": "/",
                              "import_path": "zayaserve.cluster.app:build_app",
                              "logging_config": dict(logging_config), "args": args}]}


def serve_logging(log_level: str = "warning") -> Any:
    """Serve's LoggingConfig for the controller, the proxies and (as the app's default) every
    deployment: below info, no access logs, so internal handle calls print nothing."""
    from ray.serve.schema import LoggingConfig

    level = log_level.upper()
    return LoggingConfig(log_level=level, enable_access_log=level in ("DEBUG", "INFO"))


def deploy(cfg: ClusterConfig, log_level: str = "warning") -> None:
    """Starts Serve on the connected Ray cluster and deploys the app (returns when ready).

    `log_level` sets Serve's logging where this call creates it (the controller and proxies
    only when Serve is not yet running) and is the default of every deployment in the app."""
    from ray import serve

    from zayaserve.cluster.app import build_app

    logging_config = serve_logging(log_level)
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port},
                logging_config=logging_config)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", logging_config=logging_config)


def _start_ray(args: argparse.Namespace, level: int) -> str | None:
    """Connects to RAY_ADDRESS, or starts a new local Ray; returns the dashboard URL, if any."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=level)
        return None
    dashboard = not args.no_dashboard
    # address="local": always a cluster of our own, never one a `ray start` left running.
    ctx = ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                   dashboard_port=args.dashboard_port if dashboard else None,
                   logging_level=level)
    url = getattr(ctx, "dashboard_url", None) if dashboard else None
    return f"http://{url}" if url and "://" not in url else url


def _status_command(dashboard_url: str) -> str:
    """Ray Serve's `serve status` for this cluster: Ray turns token auth on for a new local
    cluster (token in ~/.ray/auth_token), and the `serve` CLI sends it only when told to."""
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    address = "" if dashboard_url.rstrip("/") in (
        "http://127.0.0.1:8265", "http://localhost:8265") else f" --address {dashboard_url}"
    return f"{auth}serve status{address}"


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    cfg = config_from_args(args)
    if args.print_serve_config:
        import yaml

        print(yaml.safe_dump(serve_config(cfg, args.log_level), sort_keys=False), end="")
        return 0
    level = getattr(logging, args.log_level.upper())
    embedded = not os.environ.get("RAY_ADDRESS")
    dashboard_url = _start_ray(args, level)
    logging.getLogger("ray.serve").setLevel(level)  # the driver's Serve client
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(cfg, args.log_level)
        print(f"zayaserve: serving {cfg.model_name!r} "
              f"({cfg.attention_workers} attention worker(s), {cfg.expert_shards} expert "
              f"shard(s), replication {cfg.expert_replication})", flush=True)
        print(f"  REST (OpenAI): http://{cfg.http_host}:{cfg.http_port}/v1", flush=True)
        if cfg.grpc_port:
            print(f"  gRPC:          {cfg.http_host}:{cfg.grpc_port} "
                  "(zayaserve.v1.Generation)", flush=True)
        if dashboard_url:
            print(f"  Ray dashboard: {dashboard_url}", flush=True)
            print(f"  status:        {_status_command(dashboard_url)}", flush=True)
        print("  Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        print("zayaserve: shutting down", flush=True)
        serve.delete(APP_NAME, _blocking=True)
        serve.shutdown()
        if embedded:
            ray.shutdown()
    return 0
