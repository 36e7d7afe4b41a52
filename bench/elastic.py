"""Elasticity's cost, measured on a real local Ray Serve cluster under streaming load.

Eight greedy streaming clients run throughout; every chunk's arrival is timed, so inter-token
latency (ITL) is known for each moment. Phases, in one run:

1. steady: two expert shards, nothing changing (the baseline);
2. resize up: `POST /v1/cluster/scale {"expert_shards": 3}`, followed to `done`;
3. resize down: back to 2 (cover, Serve's removal, re-placement);
4. with --eplb, a second deployment of a Zipf-skewed checkpoint with EPLB on (4 shards, 4
   redundant experts): steady until the first rebalance, then the rebalance itself.

Printed per resize: seconds from the scale call to the new epoch serving (commit) and to done;
ITL p50/p99/max during the resize against steady (the ratio); the router's pause at the switch,
i.e. the longest gap any stream saw within a second of the commit, against steady's max gap.
For the EPLB phase: balancedness before/after and the longest gap during the rebalance against
the steady p99 ("a normal step").

    python -m zayaserve.bench.elastic [--model tiny] [--streams 8] [--steady-s 15] [--eplb]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = ["The capital of", "Once upon a time", "zayaserve streams tokens", "1 2 3 4"]


class Streams:
    """`n` streaming clients in a thread of their own; (arrival time, gap) of every chunk."""

    def __init__(self, base: str, model: str, n: int, max_tokens: int = 48) -> None:
        self.base, self.model, self.n, self.max_tokens = base, model, n, max_tokens
        self.gaps: list[tuple[float, float]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        k = i
        while not self.stop.is_set():
            body = {"model": self.model, "prompt": PROMPTS[k % len(PROMPTS)], "stream": True,
                    "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
            k += 1
            try:
                async with client.stream("POST", self.base + "/v1/completions", json=body,
                                         timeout=300) as r:
                    if r.status_code != 200:
                        self.failures.append(f"HTTP {r.status_code}")
                        continue
                    last = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        now = time.monotonic()
                        if last is not None:
                            self.gaps.append((now, now - last))
                        last = now
            except httpx.HTTPError as err:
                self.failures.append(repr(err))

    async def _main(self) -> None:
        async with httpx.AsyncClient() as client:
            await asyncio.gather(*(self._one(client, i) for i in range(self.n)))

    def between(self, t0: float, t1: float) -> list[float]:
        return [g for t, g in self.gaps if t0 <= t <= t1]


def _stats(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"n": 0}
    q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0]] * 99
    return {"n": len(gaps), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "max_ms": max(gaps) * 1e3}


def _call(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    r = httpx.request(method, base + path, json=body, timeout=60)
    r.raise_for_status()
    return r.json()


def _resize(base: str, streams: Streams, shards: int, steady: dict[str, float]
            ) -> dict[str, Any]:
    t0 = time.monotonic()
    op = _call(base, "POST", "/v1/cluster/scale", {"expert_shards": shards})["operation"]
    start_epoch, committed = op["start_epoch"], None
    while op["phase"] not in ("done", "failed"):
        time.sleep(0.1)
        op = _call(base, "GET", f"/v1/cluster/operations/{op['id']}")
        if committed is None and op["epoch"] > start_epoch and op["phase"] == "committing":
            committed = time.monotonic()
    t1 = time.monotonic()
    commit = committed or t1
    during = _stats(streams.between(t0, t1))
    switch = streams.between(commit - 1.0, commit + 1.0)
    return {"to_shards": shards, "phase": op["phase"], "epochs": [start_epoch, op["epoch"]],
            "s_to_new_epoch": round(commit - t0, 2), "s_to_done": round(t1 - t0, 2),
            "itl_during": during, "p99_ratio_vs_steady": round(
                during.get("p99_ms", 0) / steady["p99_ms"], 2),
            "max_gap_at_switch_ms": round(max(switch) * 1e3, 1) if switch else None,
            "steady_max_gap_ms": round(steady["max_ms"], 1)}


def _deploy(model: str, shards: int, http_port: int, **extra: Any) -> str:
    from zayaserve.cluster.config import ClusterConfig
    from zayaserve.cluster.serve_cli import deploy

    cfg = ClusterConfig.create(model=model, expert_shards=shards, http_port=http_port,
                               grpc_port=0, replica_num_cpus=0.1,
                               engine={"num_threads": 1, "max_num_seqs": 8}, **extra)
    deploy(cfg)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # every shard registered
        view = _call(base, "GET", "/v1/cluster/placement")
        if sum(s["state"] == "serving" for s in view["shards"]) == shards:
            return base
        time.sleep(0.5)
    raise TimeoutError("shards did not register")


def run_resizes(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    base = _deploy(args.model, 2, args.http_port)
    streams = Streams(base, Path(args.model).name, args.streams)
    streams.thread.start()
    time.sleep(5)  # warm up
    t0 = time.monotonic()
    time.sleep(args.steady_s)
    steady = _stats(streams.between(t0, time.monotonic()))
    up = _resize(base, streams, 3, steady)
    time.sleep(3)
    down = _resize(base, streams, 2, steady)
    streams.stop.set()
    streams.thread.join(timeout=300)
    serve.delete("zayaserve", _blocking=True)
    return {"steady": steady, "up": up, "down": down, "failures": streams.failures[:5],
            "failed_requests": len(streams.failures)}


def run_eplb(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from zayaserve.replicas.devtools.skewed_checkpoint import write_skewed_checkpoint

    model = write_skewed_checkpoint(Path(tempfile.mkdtemp()) / "zipf", strength=0.1)
    base = _deploy(str(model), 4, args.http_port,
                   eplb={"enabled": True, "interval_s": args.steady_s + 5, "window_s": 3,
                         "redundant_experts": 4})
    streams = Streams(base, "zipf", args.streams)
    streams.thread.start()
    view = _call(base, "GET", "/v1/cluster/placement")
    while view["rebalances"] == 0 and (view["balancedness"] is None
                                       or sum(view["expert_load"]) == 0):
        time.sleep(0.5)
        view = _call(base, "GET", "/v1/cluster/placement")
    t0 = time.monotonic()
    before = view
    while view["rebalances"] == 0:
        time.sleep(0.2)
        view = _call(base, "GET", "/v1/cluster/placement")
        if view["rebalances"] == 0:
            before = view
    t_start = time.monotonic()
    steady = _stats(streams.between(t0, t_start))
    while view["pending"] is not None:
        time.sleep(0.1)
        view = _call(base, "GET", "/v1/cluster/placement")
    t_commit = time.monotonic()
    time.sleep(5)  # the grace, then the load average settles
    after = _call(base, "GET", "/v1/cluster/placement")
    streams.stop.set()
    streams.thread.join(timeout=300)
    serve.delete("zayaserve", _blocking=True)
    during = _stats(streams.between(t_start, t_commit + 4))
    return {"balancedness_before": before["balancedness"],
            "balancedness_after": after["balancedness"],
            "observed_before": before["observed_balancedness"],
            "observed_after": after["observed_balancedness"],
            "s_rebalance_to_commit": round(t_commit - t_start, 2),
            "steady": steady, "during_rebalance": during,
            "max_gap_minus_steady_p99_ms": round(during.get("max_ms", 0) - steady["p99_ms"], 1),
            "failed_requests": len(streams.failures)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--steady-s", type=float, default=15.0)
    p.add_argument("--http-port", type=int, default=8123)
    p.add_argument("--eplb", action="store_true", help="also measure an EPLB rebalance")
    args = p.parse_args(argv)
    import ray

    ray.init(include_dashboard=False, logging_level=logging.ERROR, num_cpus=4, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    from ray import serve

    serve.start(http_options={"port": args.http_port})
    out: dict[str, Any] = {"resize": run_resizes(args)}
    if args.eplb:
        out["eplb"] = run_eplb(args)
    print(json.dumps(out, indent=2))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
