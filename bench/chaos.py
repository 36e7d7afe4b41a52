"""Faults under load, measured: the chaos benchmark on a multi-node Ray on this machine.

The chart's topology (`chaos_cluster`: head, two attention nodes, two expert nodes, each a Ray
node with its own processes), the app with expert replication 2, a shared prefix cache on a
real redis-server, and steady streaming load (`chaos_load`: greedy and seeded clients, every
answer checked against the offline engine). One fault at a time, then two at once; before
each, the cluster is whole again (replicas back, a lost node replaced, as KubeRay would).

Per fault: requests in the phase, those failed (by cause), those whose text changed (must be
0), streams moved to another worker (the ingress's migrations), seconds until the text rate
is back to 80% of the rate before the fault, and whether every request after that was exact.

    python -m zayaserve.bench.chaos [--faults all|name,name] [--clients 16] [--json out.json]

Faults: worker-kill, attention-node, shard-kill, expert-node, shard-sigstop, controller-idle,
controller-mid-resize, redis, ingress, proxy, attention-node+shard-kill; then the baselines,
each a redeploy: worker-kill-no-migration and attention-node-no-migration (migration_limit 0),
shard-kill-r1 (expert replication 1). The last line compares failed requests with and
without migration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from zayaserve.bench.chaos_cluster import (
    ADMIN_KEY,
    ChaosCluster,
    actors,
    busiest_worker,
    node_of,
    signal_replica,
)
from zayaserve.bench.chaos_load import REFUSED, Load, recovery_s, truths
from zayaserve.bench.local_services import RedisServer

STOP_S = 8.0  # how long a SIGSTOPped shard stays stopped (past the router's 3 s deadline)
MAX_OBSERVE_S = 120.0  # the longest a fault is watched for the load to come back
REDIS_DOWN_S = 5.0  # how long Redis stays down before it is started again
ORDER = ["worker-kill", "attention-node", "shard-kill", "expert-node", "shard-sigstop",
         "controller-idle", "controller-mid-resize", "redis", "ingress", "proxy",
         "attention-node+shard-kill",
         # The baselines: a redeploy without migration, then one at replication 1.
         "worker-kill-no-migration", "attention-node-no-migration", "shard-kill-r1"]


def deployment(fault: str) -> dict[str, Any]:
    """The app settings a fault runs under (a suffix changes them)."""
    return {"expert_replication": 1 if fault.endswith("-r1") else 2,
            "migration_limit": 0 if fault.endswith("-no-migration") else 3}


class Chaos:
    def __init__(self, cluster: ChaosCluster, redis: RedisServer) -> None:
        self.c, self.redis = cluster, redis
        self.admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        self.resize_id = ""

    # ---- faults: each does its harm and starts what a Kubernetes cluster would do after ----

    def worker_kill(self) -> None:
        signal_replica("#AttentionWorker#")

    def attention_node(self) -> None:
        self._lose_node("#AttentionWorker#", "attention")

    def shard_kill(self) -> None:
        signal_replica("#ExpertShard#")

    def expert_node(self) -> None:
        self._lose_node("#ExpertShard#", "expert")

    def _lose_node(self, part: str, kind: str) -> None:
        node_id = node_of(busiest_worker() if kind == "attention" else actors(part)[0])
        [node] = [n for n in self.c.nodes[kind] if n.node_id == node_id]
        self.c.remove_node(node)
        self.c.add_node(kind)  # its replacement pod

    def shard_sigstop(self) -> None:
        pid = signal_replica("#ExpertShard#", signal.SIGSTOP)
        threading.Timer(STOP_S, lambda: _signal(pid, signal.SIGCONT)).start()

    def controller_idle(self) -> None:
        signal_replica("#PlacementController#")

    def controller_mid_resize(self) -> None:
        self.c.add_node("expert")  # room for a third shard
        r = httpx.post(self.c.base + "/v1/cluster/scale", json={"expert_shards": 3},
                       headers=self.admin, timeout=30)
        assert r.status_code in (200, 202), r.text
        self.resize_id = r.json()["operation"]["id"]
        time.sleep(1.0)
        signal_replica("#PlacementController#")

    def resize_phase(self, timeout: float = 180) -> str:
        """The phase the resize the controller was killed in reached (done or failed), or
        where it still was after `timeout`."""
        phase, deadline = "unknown", time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.c.base}/v1/cluster/operations/{self.resize_id}",
                          headers=self.admin, timeout=30)
            if r.status_code == 200:
                phase = r.json()["phase"]
                if phase in ("done", "failed"):
                    break
            time.sleep(1.0)
        return phase

    def redis_down(self) -> None:
        self.redis.kill()
        threading.Timer(REDIS_DOWN_S, self.redis.start).start()

    def ingress(self) -> None:
        signal_replica("#Ingress#")

    def proxy(self) -> None:
        signal_replica("SERVE_PROXY_ACTOR")

    def node_and_shard(self) -> None:
        self.attention_node()
        self.shard_kill()

    def faults(self) -> dict[str, Callable[[], None]]:
        return {"worker-kill": self.worker_kill, "attention-node": self.attention_node,
                "shard-kill": self.shard_kill, "expert-node": self.expert_node,
                "shard-sigstop": self.shard_sigstop, "controller-idle": self.controller_idle,
                "controller-mid-resize": self.controller_mid_resize, "redis": self.redis_down,
                "ingress": self.ingress, "proxy": self.proxy,
                "attention-node+shard-kill": self.node_and_shard,
                "worker-kill-no-migration": self.worker_kill,
                "attention-node-no-migration": self.attention_node,
                "shard-kill-r1": self.shard_kill}

    # ---- the cluster whole again -----------------------------------------------------------

    def wait_whole(self, shards: int, timeout: float = 300) -> float:
        """Seconds until both workers and `shards` shards serve and a probe is answered."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                view = httpx.get(self.c.base + "/v1/cluster/placement", headers=self.admin,
                                 timeout=10).json()
                serving = [s for s in view.get("shards") or [] if s["state"] == "serving"]
                live = len(actors("#AttentionWorker#"))
                if (len(serving) == shards and not view.get("operation") and live == 2
                        and self._probe()):
                    return time.monotonic() - t0
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"the cluster was not whole again within {timeout:.0f} s")

    def _probe(self) -> bool:
        r = httpx.post(self.c.base + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "1 2 3 4", "max_tokens": 4, "temperature": 0})
        return r.status_code == 200

    def migrations(self) -> float:
        text = httpx.get(self.c.base + "/metrics", timeout=30).text
        m = re.search(r'^zayaserve_request_migrations_total\{outcome="moved"\} (\S+)$', text,
                      re.M)
        return float(m.group(1)) if m else 0.0

    def scale_back(self) -> None:
        view = httpx.get(self.c.base + "/v1/cluster/placement", headers=self.admin,
                         timeout=10).json()
        if len(view.get("shards") or []) != 2 or view.get("operation") is not None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                r = httpx.post(self.c.base + "/v1/cluster/scale", json={"expert_shards": 2},
                               headers=self.admin, timeout=30)
                if r.status_code in (200, 202):
                    return
                time.sleep(3.0)  # a resize still running, or the cooldown


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def run_fault(chaos: Chaos, name: str, want: list[str], max_tokens: int, warm_s: float,
              observe_s: float) -> dict[str, Any]:
    moved0 = chaos.migrations()
    load = Load(chaos.c.base, want, max_tokens).start()
    time.sleep(warm_s)
    fault = time.monotonic()
    baseline = load.rate(fault - warm_s / 2, fault)
    chaos.faults()[name]()
    time.sleep(observe_s)
    while (time.monotonic() < fault + MAX_OBSERVE_S  # not back yet: watch on, for a while
           and recovery_s(load, fault, baseline, time.monotonic()) is None):
        time.sleep(2.0)
    load.finish()
    end = max([o.end for o in load.outcomes], default=time.monotonic())
    rec = recovery_s(load, fault, baseline, end)
    failed = Counter(o.cause for o in load.outcomes if o.cause not in (None, REFUSED))
    refused = sum(o.cause == REFUSED for o in load.outcomes)
    after = [o for o in load.outcomes if rec is not None and o.start >= fault + rec]
    row = {"fault": name, "requests": len(load.outcomes) - refused, "refused": refused,
           "in_flight_at_fault": sum(o.start <= fault <= o.end for o in load.outcomes),
           "failed": sum(failed.values()), "failed_by_cause": dict(failed),
           "changed": sum(o.cause is None and not o.exact for o in load.outcomes),
           "baseline_chunks_per_s": round(baseline, 1),
           "recovery_s": None if rec is None else round(rec, 1),
           "after_recovery": len(after),
           "after_recovery_exact": all(o.cause is None and o.exact for o in after)}
    try:  # (None where the sums started again: a placement controller restart)
        moved = chaos.migrations() - moved0
        row["migrations"] = moved if moved >= 0 else None
    except httpx.HTTPError:
        row["migrations"] = None
    return row


def summarize(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table; failed requests with migration against the same fault
    without it (the baseline)."""
    print("| fault | requests | in flight at fault | failed (cause) | refused | changed | moved "
          "| recovery s | exact after |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        causes = ", ".join(f"{n} {c}" for c, n in r.get("failed_by_cause", {}).items())
        print(f"| {r['fault']} | {r['requests']} | {r['in_flight_at_fault']} | {r['failed']}"
              f"{f' ({causes})' if causes else ''} | {r.get('refused', 0)} | {r['changed']} | "
              f"{_num(r.get('migrations'))} | {_num(r.get('recovery_s'))} | "
              f"{'yes' if r['after_recovery_exact'] else 'NO'} ({r['after_recovery']}) |")
    by = {r["fault"]: r for r in rows}
    for fault in ("worker-kill", "attention-node"):
        on, off = by.get(fault), by.get(f"{fault}-no-migration")
        if on and off:
            print(f"{fault}: {on['failed']} of {on['in_flight_at_fault']} in-flight requests "
                  f"failed with migration, {off['failed']} of {off['in_flight_at_fault']} "
                  f"without", flush=True)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", default="all", help="all, or names joined by commas")
    ap.add_argument("--clients", type=int, default=16, help="streams (half greedy)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--warm-s", type=float, default=8.0)
    ap.add_argument("--observe-s", type=float, default=25.0)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    names = ORDER if a.faults == "all" else a.faults.split(",")
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        ap.error(f"--faults: unknown {unknown}; known: {', '.join(ORDER)}")
    # SIGTERM ends the run as an error does: every node and Redis shut down (`finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    want = truths(a.clients, a.max_tokens)
    redis = RedisServer()
    cluster = ChaosCluster()
    chaos, rows = Chaos(cluster, redis), []
    try:
        current: dict[str, Any] | None = None
        for name in sorted(names, key=ORDER.index):
            if deployment(name) != current:
                current = deployment(name)
                cluster.deploy(**current, dispatch_deadline_s=3.0, scale_cooldown_s=0,
                               engine={"kv_cache_redis_url": redis.url})
            whole_s = chaos.wait_whole(2)
            row = run_fault(chaos, name, want, a.max_tokens, a.warm_s, a.observe_s)
            row.update(current, whole_before_s=round(whole_s, 1))
            if name == "controller-mid-resize":
                row["resize"] = chaos.resize_phase()
                chaos.scale_back()
            rows.append(row)
            print(json.dumps(row), flush=True)
        summarize(rows)
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        cluster.shutdown()
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
