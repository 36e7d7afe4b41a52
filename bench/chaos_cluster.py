"""The chart's topology on one machine, for the chaos benchmark (`bench/chaos.py`): a head node
(Serve's controller and proxy, the ingress and the placement controller), attention nodes and
expert nodes, each a Ray node of `ray.cluster_utils.Cluster` (its own raylet and worker
processes). Each attention and expert node holds one replica (custom resources `attention` and
`expert`, one each), as a Kubernetes pod does, so a node lost takes its replica's processes
with it and a replacement node (KubeRay would start a pod) gives the replica a place again.

Also here: the processes the faults hit (a replica's pid, the proxy's), and a real
redis-server for the shared prefix cache.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from zayaserve.bench.local_services import free_port

ADMIN_KEY = "chaos-admin-key"
# One machine, not pods: a small object store per node (nothing large goes through it).
OBJECT_STORE_BYTES = 80 * 2**20


class ChaosCluster:
    """Head + `attention` + `expert` nodes, Serve on the head (proxy there only: one machine
    has one port to give), the app deployed with `config` overrides."""

    def __init__(self, attention: int = 2, expert: int = 2) -> None:
        import ray
        from ray.cluster_utils import Cluster

        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        os.environ.update(env)
        self.ray = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"head": 100}, "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False})
        self.workers, self.shards = attention, expert  # one replica per node when whole
        self.nodes: dict[str, list[Any]] = {"attention": [], "expert": []}
        for _ in range(attention):
            self.add_node("attention")
        for _ in range(expert):
            self.add_node("expert")
        ray.init(address=self.ray.address, logging_level=logging.ERROR, log_to_driver=False,
                 runtime_env={"env_vars": env})
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.cfg: Any = None

    def add_node(self, kind: str) -> Any:
        node = self.ray.add_node(num_cpus=1, resources={kind: 1},
                                 object_store_memory=OBJECT_STORE_BYTES)
        self.nodes[kind].append(node)
        return node

    def remove_node(self, node: Any) -> None:
        """Every process of the node, SIGKILLed (a pod lost with its machine)."""
        for kind in self.nodes.values():
            if node in kind:
                kind.remove(node)
        self.ray.remove_node(node, allow_graceful=False)

    def deploy(self, **overrides: Any) -> None:
        from ray import serve

        from zayaserve.cluster.config import ClusterConfig
        from zayaserve.cluster.serve_cli import deploy

        engine = {"num_threads": 1, **overrides.pop("engine", {})}
        self.cfg = ClusterConfig.create(**{
            "model": "tiny", "http_port": self.http_port, "grpc_port": 0,
            "attention_workers": self.workers, "expert_shards": self.shards,
            "replica_num_cpus": 0.05, "admin_api_key": ADMIN_KEY,
            "ingress_ray_resources": {"head": 1}, "attention_ray_resources": {"attention": 1},
            "expert_ray_resources": {"expert": 1}, "engine": engine, **overrides})
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": self.http_port})
        deploy(self.cfg)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.ray.shutdown()


def actors(part: str) -> list[dict[str, Any]]:
    """Named Ray actors whose name holds `part` (a Serve replica: "#AttentionWorker#"), sorted
    by name."""
    from ray.util import list_named_actors

    return sorted((a for a in list_named_actors(all_namespaces=True) if part in a["name"]),
                  key=lambda a: a["name"])


def run_in(actor: dict[str, Any], fn: Any, timeout: float = 30) -> Any:
    """fn(the actor's instance), run in the actor's process; its result."""
    import ray

    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    ref: Any = handle.__ray_call__.remote(fn)
    return ray.get(ref, timeout=timeout)


def pid_of(actor: dict[str, Any]) -> int:
    return int(run_in(actor, lambda _: os.getpid()))


def node_of(actor: dict[str, Any]) -> str:
    """The Ray node id an actor runs on."""
    import ray

    return str(run_in(actor, lambda _: ray.get_runtime_context().get_node_id()))


def busiest_worker() -> dict[str, Any]:
    """The attention worker replica running the most requests (read through Serve's private
    replica wrapper: a benchmark's look inside)."""

    def running(replica: Any) -> int:
        worker = replica._replica_impl._user_callable_wrapper._callable
        return int(worker.engine.engine.stats()["num_requests_running"])

    return max(actors("#AttentionWorker#"), key=lambda a: int(run_in(a, running)))


def signal_replica(part: str, sig: int = signal.SIGKILL) -> int:
    """Sends `sig` to the process of a replica whose name holds `part` (the busiest, for an
    attention worker; else the first by name); its pid."""
    actor = busiest_worker() if part == "#AttentionWorker#" else actors(part)[0]
    pid = pid_of(actor)
    os.kill(pid, sig)
    return pid
