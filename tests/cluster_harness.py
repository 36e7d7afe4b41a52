"""A real local Ray Serve cluster for the e2e tests: one Ray per test session (the fixtures
are in conftest.py), one `zayaserve` app deployed at a time."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import grpc
import httpx
import openai

from zayaserve.cluster.config import ClusterConfig
from zayaserve.replicas.cluster_messages import PlacementUpdate
from zayaserve.router.protos import expert_pb2, expert_pb2_grpc
from zayaserve.router.shard_channels import call_metadata

# Serve runs one HTTP proxy per Ray session: every app deployed in it shares this port.
HTTP_PORT = 0
PROMPTS = ["The capital of", "Once upon a time", "zayaserve streams tokens", "1 2 3 4"]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.base = f"http://127.0.0.1:{cfg.http_port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0)

    def placement(self) -> PlacementUpdate:
        from ray import serve

        handle = serve.get_deployment_handle("PlacementController", app_name="zayaserve")
        return handle.placement.remote().result()  # type: ignore[no-any-return]

    def placement_view(self) -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle("PlacementController", app_name="zayaserve")
        return handle.view.remote().result()  # type: ignore[no-any-return]

    def shard_token(self) -> str:
        """The shards' RPC token, read out of a live shard replica. The app hands it to nobody
        else, so this goes through Serve's private replica wrapper (test-only)."""
        import ray
        from ray.util import list_named_actors

        def _token(replica: Any) -> str:
            return str(replica._replica_impl._user_callable_wrapper._callable._rpc_token)

        shards = [a for a in list_named_actors(all_namespaces=True)
                  if "ExpertShard" in a["name"]]
        for actor in shards:
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                return str(ray.get(handle.__ray_call__.remote(_token), timeout=30))
            except Exception:  # a replica being replaced; another one knows it too
                continue
        raise RuntimeError(f"no live ExpertShard replica answered ({len(shards)} listed)")

    def shard_infos(self) -> list[Any]:
        metadata = call_metadata(self.shard_token())
        infos = []
        for address in self.placement().addresses.values():
            with grpc.insecure_channel(address) as ch:
                infos.append(expert_pb2_grpc.ExpertShardStub(ch).Info(
                    expert_pb2.InfoRequest(), timeout=10, metadata=metadata))
        return infos

    def wait_all_shards(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.placement().addresses) == self.cfg.expert_shards:
                return
            time.sleep(0.5)
        raise TimeoutError("expert shards did not all register")


class Load:
    """`n` client threads sending greedy completions until stopped; every answer is checked
    against the offline engine's tokens."""

    def __init__(self, c: Cluster, offline: dict[str, list[int]] | None = None, n: int = 8,
                 headers: dict[str, str] | None = None, want: dict[str, str] | None = None,
                 model: str = "tiny") -> None:
        """`offline`: the tiny model's greedy token ids per prompt; or `want`: texts."""
        if want is None:
            from zayaserve.replicas.model.checkpoint_paths import resolve_model
            from zayaserve.replicas.model.tokenizer import Tokenizer

            tok = Tokenizer.from_pretrained(resolve_model("tiny"))
            want = {p: tok.decode((offline or {})[p]) for p in PROMPTS}
        self.want, self.model = want, model
        self.c, self.stop, self.headers = c, threading.Event(), headers or {}
        self.failures: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            prompt = PROMPTS[k % len(PROMPTS)]
            k += 1
            try:
                r = httpx.post(self.c.base + "/v1/completions", headers=self.headers, timeout=180,
                               json={"model": self.model, "prompt": prompt, "temperature": 0,
                                     "max_tokens": MAX_TOKENS, "ignore_eos": True})
            except httpx.HTTPError as err:
                self.failures.append(repr(err))
                continue
            if r.status_code != 200:
                self.failures.append(f"{r.status_code}: {r.text[:300]}")
            elif r.json()["choices"][0]["text"] != self.want[prompt]:
                self.failures.append(f"changed tokens for {prompt!r}: {r.text[:300]}")
            else:
                self.done += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=240)


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def replica_actors(deployment: str) -> list[dict[str, Any]]:
    """The named Ray actors of one Serve deployment's replicas, sorted by name."""
    from ray.util import list_named_actors

    return sorted((a for a in list_named_actors(all_namespaces=True)
                   if f"#{deployment}#" in a["name"]), key=lambda a: a["name"])


def offline_texts(offline: dict[str, Any]) -> dict[str, str]:
    """The offline engine's completion of each prompt, as text."""
    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(resolve_model("tiny"))
    return {p: tok.decode(offline[p]) for p in PROMPTS}


def worker_stats_when_idle(timeout: float = 30) -> dict[str, Any]:
    """An attention worker's stats once it runs nothing and every KV block is back (or at
    `timeout`, as they are then)."""
    from ray import serve

    deadline = time.time() + timeout
    while True:
        stats: dict[str, Any] = serve.get_deployment_handle(
            "AttentionWorker", app_name="zayaserve").stats.remote().result()
        idle = stats["num_requests_running"] == 0 and \
            stats["kv_blocks_free"] == stats["kv_blocks_total"]
        if idle or time.time() > deadline:
            return stats
        time.sleep(0.5)


def deploy(**overrides: Any) -> Cluster:
    """Deploys the app (ClusterConfig fields as overrides; `engine={...}` is merged into the
    harness's engine settings) and waits for its shards."""
    from zayaserve.cluster.serve_cli import deploy as serve_deploy

    global HTTP_PORT
    HTTP_PORT = HTTP_PORT or free_port()
    grpc_port = free_port()
    while grpc_port == HTTP_PORT:  # nothing listens on HTTP_PORT yet, so it can come back
        grpc_port = free_port()
    engine = {"num_threads": 1, **overrides.pop("engine", {})}
    cfg = ClusterConfig.create(**{"model": "tiny", "http_port": HTTP_PORT,
                                  "grpc_port": grpc_port, "replica_num_cpus": 0.1,
                                  "engine": engine, **overrides})
    serve_deploy(cfg)
    cluster = Cluster(cfg)
    cluster.wait_all_shards()
    return cluster


def undeploy() -> None:
    from ray import serve

    serve.delete("zayaserve", _blocking=True)


