"""The placement controller restarted mid-resize on a real local Ray Serve: resizes 2 -> 3 and
3 -> 2 expert shards under 8 greedy streams, the controller's replica killed right after each
started (Serve starts another). The new replica resumes from the GCS store: the epoch and the map
version seen on /v1/cluster/placement never go back, the same operation answers and completes,
Serve runs the counts the recovered state asks for, the workers adopt the new generation's map,
and no request fails or changes its tokens."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster_harness import Cluster, Load, deploy, replica_actors, undeploy, wait_for

pytestmark = pytest.mark.e2e
KEY = "restart-admin-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def restartable(ray_session: None) -> Iterator[Cluster]:
    c = deploy(expert_shards=2, expert_replication=1, engine={"max_num_seqs": 8},
               admin_api_key=KEY, scale_cooldown_s=0)
    yield c
    undeploy()


class Watch:
    """Polls /v1/cluster/placement in one thread: (time, epoch, version) of every answer, in
    the order the controller gave them, and the failed polls (the controller down)."""

    def __init__(self, c: Cluster) -> None:
        self.c, self.stop = c, threading.Event()
        self.seen: list[tuple[float, int, int]] = []
        self.errors: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                r = httpx.get(self.c.base + "/v1/cluster/placement", headers=HEADERS,
                              timeout=30)
                if r.status_code == 200:
                    v = r.json()
                    self.seen.append((time.monotonic(), v["epoch"], v["version"]))
                else:
                    self.errors.append((time.monotonic(), f"{r.status_code}"))
            except httpx.HTTPError as err:
                self.errors.append((time.monotonic(), repr(err)))
            time.sleep(0.1)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def _controllers() -> list[dict[str, Any]]:
    return replica_actors("PlacementController")


def _operation(c: Cluster, op_id: str) -> dict[str, Any] | None:
    r = httpx.get(f"{c.base}/v1/cluster/operations/{op_id}", headers=HEADERS, timeout=30)
    return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]


def _running(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications["zayaserve"].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if state == "RUNNING")


def _worker_generation() -> int:
    from ray import serve

    handle = serve.get_deployment_handle("AttentionWorker", app_name="zayaserve")
    return int(handle.describe.remote().result()["placement_generation"])


def _resize_killing_the_controller(c: Cluster, offline: dict, shards: int) -> dict[str, Any]:
    """Resizes to `shards` under 8 streams, kills the controller's replica right after the
    resize started, and checks what must hold through the restart; returns the last view."""
    import ray

    before = c.placement_view()
    [victim] = _controllers()
    wait_for(lambda: _worker_generation() == before["generation"], 30, "workers' map")
    with Watch(c) as watch, Load(c, offline) as load:
        wait_for(lambda: load.done >= 8, 120, "the first answers")
        r = httpx.post(c.base + "/v1/cluster/scale", json={"expert_shards": shards},
                       headers=HEADERS, timeout=30)
        assert r.status_code == 202, r.text
        op_id = r.json()["operation"]["id"]
        served_at_kill = load.done
        killed = time.monotonic()
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]),
                 no_restart=False)
        wait_for(lambda: [a["name"] for a in _controllers()] not in ([], [victim["name"]]),
                 120, "Serve's new controller replica")
        wait_for(lambda: _operation(c, op_id) is not None, 120, "the operation after restart")
        back = time.monotonic() - killed
        wait_for(lambda: (_operation(c, op_id) or {}).get("phase") in ("done", "failed"), 240,
                 "the resumed resize")
        served = load.done
        wait_for(lambda: load.done >= served + 8, 120, f"answers on {shards} shards")
    after = c.placement_view()
    op = _operation(c, op_id)
    print(f"\n{len(before['shards'])} -> {shards} shards. before: generation "
          f"{before['generation']} epoch {before['epoch']} version {before['version']}; after: "
          f"generation {after['generation']} epoch {after['epoch']} version "
          f"{after['version']}; controller back in {back:.1f} s; polls {len(watch.seen)} ok / "
          f"{len(watch.errors)} failed; requests {load.done} served ({served_at_kill} before "
          f"the kill) / {len(load.failures)} failed")
    print("epoch/version seen:", sorted({(e, v) for _, e, v in watch.seen}))
    print("operation:", op)
    assert not load.failures, load.failures[:3]
    assert op is not None and op["id"] == op_id and op["phase"] == "done", op
    assert any("restarted" in h for h in op["history"]), op["history"]
    # The epoch and the version only grew, through the restart, in every answer seen.
    epochs, versions = [e for _, e, _ in watch.seen], [v for _, _, v in watch.seen]
    assert epochs == sorted(epochs) and versions == sorted(versions), watch.seen
    assert any(t < killed for t, _, _ in watch.seen) and any(t > killed for t, _, _ in watch.seen)
    assert after["generation"] == before["generation"] + 1
    assert after["epoch"] > before["epoch"] and after["version"] > before["version"]
    # Serve runs what the recovered state asks for; every expert is served once.
    assert after["desired_shards"] == shards
    wait_for(lambda: _running("ExpertShard") == shards, 60, f"Serve running {shards} shards")
    assert _running("PlacementController") == 1
    serving = [s for s in after["shards"] if s["state"] == "serving"]
    assert len(serving) == shards and sorted(e for s in serving for e in s["experts"]) == \
        list(range(8)), after
    wait_for(lambda: _worker_generation() == after["generation"], 30,
             "workers adopting the new generation's map")
    return after


def test_controller_killed_mid_scale_up_resumes(restartable: Cluster, offline: dict) -> None:
    """Killed at the settle step: the third shard starting while the controller is down."""
    _resize_killing_the_controller(restartable, offline, 3)


def test_controller_killed_mid_scale_down_resumes(restartable: Cluster, offline: dict) -> None:
    """Killed at the cover step (every expert being copied to a second shard before Serve may
    remove any): the copies, then the removal and the re-plan, go on under the new replica."""
    _resize_killing_the_controller(restartable, offline, 2)


def test_a_new_deployment_starts_afresh_with_versions_still_growing(
        restartable: Cluster) -> None:
    """The app deleted and deployed again (as every e2e module does): its controller finds the
    old deployment's state in the store, starts a fresh placement (epoch 1, two shards), and
    numbers its maps past the old ones."""
    old = restartable.placement_view()
    undeploy()
    c = deploy(expert_shards=2, expert_replication=1, engine={"max_num_seqs": 8},
               admin_api_key=KEY, scale_cooldown_s=0)
    new = c.placement_view()
    print(f"\nredeployed: generation {old['generation']} -> {new['generation']}, epoch "
          f"{old['epoch']} -> {new['epoch']}, version {old['version']} -> {new['version']}")
    assert new["generation"] == old["generation"] + 1 and new["version"] > old["version"]
    assert new["epoch"] == 1 and new["desired_shards"] == 2 and new["operation"] is None
    assert [s["state"] for s in new["shards"]] == ["serving", "serving"]
