"""The elastic cluster on a real local Ray Serve: `zayaserve scale` 2 -> 3 -> 2 expert shards
under 8 concurrent greedy streams (no failed request, every output the offline engine's, the
epoch advancing, /v1/cluster/placement showing each stage, every other replica kept alive), the
admin API's answers (409 on a conflicting resize, 404 for an unknown operation, API key)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cluster_harness import Cluster, Load, deploy, undeploy, wait_for

from zayaserve.cluster.cli import main as cli_main
from zayaserve.cluster.control.admin_auth import ADMIN_ENV_VAR

pytestmark = pytest.mark.e2e
KEY, TENANT = "elastic-admin-key", "elastic-tenant-key"


@pytest.fixture(scope="module")
def elastic(ray_session: None) -> Iterator[Cluster]:
    # Resizes follow each other here faster than an operator's: no cooldown.
    c = deploy(expert_shards=2, expert_replication=1, engine={"max_num_seqs": 8},
               api_key=TENANT, admin_api_key=KEY, scale_cooldown_s=0)
    yield c
    undeploy()


def _headers(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _view(c: Cluster) -> dict[str, Any]:
    r = httpx.get(c.base + "/v1/cluster/placement", headers=_headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _replica_pids(name: str) -> set[str]:
    """The deployment's replica actors (a restarted replica is a new actor with a new name)."""
    from ray.util import list_named_actors

    return {a["name"] for a in list_named_actors(all_namespaces=True) if f"#{name}#" in a["name"]}


def _scale(c: Cluster, shards: int) -> None:
    os.environ[ADMIN_ENV_VAR] = KEY  # as an operator exports it
    try:
        assert cli_main(["scale", "--expert-shards", str(shards), "--url", c.base, "--wait",
                         "--timeout", "240"]) == 0
    finally:
        del os.environ[ADMIN_ENV_VAR]


def test_scale_2_3_2_under_eight_streams(elastic: Cluster, offline: dict) -> None:
    before = _view(elastic)
    assert [s["state"] for s in before["shards"]] == ["serving", "serving"]
    workers = _replica_pids("AttentionWorker")
    controller = _replica_pids("PlacementController")
    with Load(elastic, offline, headers=_headers(TENANT)) as load:
        wait_for(lambda: load.done >= 8, 120, "the first answers")
        _scale(elastic, 3)
        grown = _view(elastic)
        served = load.done
        wait_for(lambda s=served: load.done >= s + 8, 120, "answers on three shards")
        _scale(elastic, 2)
        shrunk = _view(elastic)
        served = load.done
        wait_for(lambda s=served: load.done >= s + 8, 120, "answers on two shards")
    assert not load.failures, load.failures[:3]
    assert grown["epoch"] > before["epoch"] and shrunk["epoch"] > grown["epoch"]
    serving = [s for s in grown["shards"] if s["state"] == "serving"]
    assert len(serving) == 3 and all(s["experts"] for s in serving), grown
    assert sorted(e for s in serving for e in s["experts"]) == list(range(8))
    serving = [s for s in shrunk["shards"] if s["state"] == "serving"]
    assert len(serving) == 2 and sorted(e for s in serving for e in s["experts"]) == \
        list(range(8)), shrunk
    # Serve changed the shard deployment in place: workers and controller never restarted.
    assert _replica_pids("AttentionWorker") == workers
    assert _replica_pids("PlacementController") == controller


def test_admin_api_conflict_unknown_operation_and_key(elastic: Cluster) -> None:
    base = elastic.base + "/v1/cluster"
    assert httpx.post(base + "/scale", json={"expert_shards": 3}, timeout=30).status_code == 401
    tenant = httpx.post(base + "/scale", json={"expert_shards": 3}, headers=_headers(TENANT),
                        timeout=30)
    assert tenant.status_code == 403, tenant.text
    r = httpx.post(base + "/scale", json={"expert_shards": 3}, headers=_headers(), timeout=30)
    assert r.status_code == 202, r.text
    op = r.json()["operation"]
    again = httpx.post(base + "/scale", json={"expert_shards": 3}, headers=_headers(),
                       timeout=30)
    assert again.status_code == 200 and again.json()["operation"]["id"] == op["id"]
    clash = httpx.post(base + "/scale", json={"expert_shards": 2}, headers=_headers(),
                       timeout=30)
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "conflict"
    bad = httpx.post(base + "/scale", json={"expert_shards": 99}, headers=_headers(),
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "expert_shards", bad.text
    typo = httpx.post(base + "/scale", json={"expert_shard": 2}, headers=_headers(), timeout=30)
    assert typo.status_code == 400 and "expert_shard" in typo.text
    missing = httpx.get(base + "/operations/nope", headers=_headers(), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "op_id"

    def phase() -> str:
        got = httpx.get(f"{base}/operations/{op['id']}", headers=_headers(), timeout=30)
        return str(got.json()["phase"])

    wait_for(lambda: phase() == "done", 180, "the resize to 3")
    _scale(elastic, 2)
    wait_for(lambda: len([s for s in _view(elastic)["shards"]
                           if s["state"] == "serving"]) == 2, 60, "two shards")
