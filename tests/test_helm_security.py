"""The Helm chart's hardening, rendered by a real helm: each group's NetworkPolicy admits exactly
the peers and ports the code needs (evaluated as Kubernetes does, against the pods' rendered
labels), every Ray pod runs non-root on a read-only root filesystem without a service-account
token, each secret reaches only the pods whose code reads it, the bundled Redis requires a
password that the attention workers' store and the readiness probe both send (against a real
redis-server), and the experts' disruption budget follows serve.expert_replication."""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from chart_topology_driver import pod_env
from helm_tools import (
    CHART_DIR,
    CI_FILES,
    NAMESPACE_LABELS,
    RELEASE,
    admitted,
    app_args,
    helm,
    kinds,
    matches,
    pods,
    rayservice,
    rayservice_validator,
    rendered,
    value_args,
)

REPO = CHART_DIR.parent.parent
# A shard's RPC port (a free port of the ephemeral range), a Ray worker's, the pinned raylet's.
SHARD_PORT, RAY_WORKER_PORT, RAYLET = 45123, 12345, 6380
STRANGER = {"labels": {"app": "something-else"}, "ns": NAMESPACE_LABELS}
OPERATOR = {"labels": {"app.kubernetes.io/name": "kuberay-operator"},
            "ns": {"kubernetes.io/metadata.name": "kuberay-system"}}
PROMETHEUS = {"labels": {"app": "prometheus"}, "ns": {"kubernetes.io/metadata.name": "monitoring"}}
MONITORING = [{"namespaceSelector": {"matchLabels": PROMETHEUS["ns"]}}]


@pytest.mark.parametrize("pinned", [False, True])
def test_network_policies_admit_what_the_data_flow_needs(pinned):
    docs = rendered(networkPolicy__expertRayPorts__pinned=pinned)
    head, att, exp = ({"labels": pods(docs)[g]["labels"], "ns": NAMESPACE_LABELS}
                      for g in ("head", "attention", "experts"))
    assert {p["metadata"]["name"] for p in kinds(docs, "NetworkPolicy")} == {
        f"zs-zayaserve-{g}" for g in ("head", "attention", "experts", "redis")}
    # The public ports on the head only (the Service's pods), from anywhere by default.
    for src in (None, STRANGER, OPERATOR, att):
        assert admitted(docs, "head", src, 8000) and admitted(docs, "head", src, 9000)
    for group in ("attention", "experts", "redis"):
        assert not admitted(docs, group, None, 8000) and not admitted(docs, group, STRANGER, 8000)
    # Ray's ports: this release's Ray pods only; the dashboard also for the KubeRay operator
    # (kuberayFrom: by default any pod of the cluster, never from outside it).
    for port in (6379, 8265, 10001, RAY_WORKER_PORT):
        assert admitted(docs, "head", exp, port) and admitted(docs, "head", att, port)
        assert not admitted(docs, "head", None, port)
        assert admitted(docs, "head", STRANGER, port) == (port == 8265)
    assert admitted(docs, "head", OPERATOR, 8265) and not admitted(docs, "head", OPERATOR, 6379)
    assert not admitted(docs, "attention", OPERATOR, 8265)
    for target in ("attention", "experts"):
        for src, port in itertools.product((head, att, exp), (RAY_WORKER_PORT, 52365)):
            assert admitted(docs, target, src, port)
        assert not admitted(docs, target, STRANGER, RAY_WORKER_PORT)
    assert admitted(docs, "experts", head, RAYLET)
    # The shards' RPC port: attention workers; with Ray's ports pinned, nobody else.
    assert admitted(docs, "experts", att, SHARD_PORT)
    assert not admitted(docs, "experts", STRANGER, SHARD_PORT)
    for src in (head, exp):
        assert admitted(docs, "experts", src, SHARD_PORT) == (not pinned)
    # Redis: the attention workers, its only clients.
    assert admitted(docs, "redis", att, 6379)
    for src in (head, exp, STRANGER, OPERATOR, None):
        assert not admitted(docs, "redis", src, 6379)
    # Metrics: nobody unless metricsFrom says so.
    assert not any(admitted(docs, g, PROMETHEUS, 8080) for g in ("head", "attention", "experts"))


def test_network_policy_knobs():
    ingress_ns = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ing"}}}]
    docs = rendered(networkPolicy__publicFrom=ingress_ns, networkPolicy__metricsFrom=MONITORING)
    nginx = {"labels": {"app": "nginx"}, "ns": {"kubernetes.io/metadata.name": "ing"}}
    assert admitted(docs, "head", nginx, 8000) and admitted(docs, "head", nginx, 9000)
    assert not admitted(docs, "head", None, 8000) and not admitted(docs, "head", STRANGER, 9000)
    assert admitted(docs, "head", OPERATOR, 8000)  # KubeRay's proxy health check
    assert admitted(docs, "head", PROMETHEUS, 8000)  # zayaserve's /metrics
    for group in ("head", "attention", "experts"):
        assert admitted(docs, group, PROMETHEUS, 8080) and not admitted(docs, group, nginx, 8080)
    # KubeRay's incremental upgrade routes through its serve Services to every proxy.
    docs = rendered("incremental-upgrade")
    assert all(admitted(docs, g, None, 8000) for g in ("head", "attention", "experts"))
    assert not admitted(docs, "attention", None, 9000)
    # Egress: open unless restricted; then Ray pods, DNS, the bundled Redis and extraTo only.
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in kinds(rendered(), "NetworkPolicy"))
    extra = {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443}]}
    docs = rendered(networkPolicy__egress={"restricted": True, "extraTo": [extra]})
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p["spec"]
                for p in kinds(docs, "NetworkPolicy")}
    assert policies["redis"]["egress"] == []
    for group in ("head", "attention", "experts"):
        egress = policies[group]["egress"]
        assert policies[group]["policyTypes"] == ["Ingress", "Egress"] and extra in egress
        to_redis = any(matches(peer["podSelector"], pods(docs)["redis"]["labels"])
                       for rule in egress for peer in rule.get("to", []) if "podSelector" in peer)
        assert to_redis == (group == "attention")
    pinned = kinds(rendered(networkPolicy__expertRayPorts__pinned=True), "NetworkPolicy")
    for version in ("1.33.0", "1.35.0"):
        for doc in kinds(docs, "NetworkPolicy") + pinned:
            kubernetes_validate.validate(doc, version, strict=True)


def test_pinned_ray_ports_reach_ray_and_the_pods():
    docs = rendered(networkPolicy__expertRayPorts__pinned=True)
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    want = {"node-manager-port": "6380", "object-manager-port": "6381",
            "dashboard-agent-grpc-port": "6382", "runtime-env-agent-port": "6383",
            "min-worker-port": "10002", "max-worker-port": "19999"}
    assert want.items() <= groups["experts"]["rayStartParams"].items()
    assert not want.keys() & groups["attention"]["rayStartParams"].keys()
    sysctls = groups["experts"]["template"]["spec"]["securityContext"]["sysctls"]
    assert sysctls == [{"name": "net.ipv4.ip_local_port_range", "value": "32768 60999"}]
    rayservice_validator().validate(rayservice(docs))  # KubeRay's CRD, and Kubernetes' own:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {
        "name": "experts"}, "template": groups["experts"]["template"]}, "1.35.0", strict=True)
    done = helm("template", RELEASE, str(CHART_DIR), *value_args((), {
        "networkPolicy.expertRayPorts.pinned": True,
        "networkPolicy.expertRayPorts.objectManager": 40000}), check=False)
    assert done.returncode != 0 and "objectManager (40000) lies in shardPortRange" in done.stderr


@pytest.mark.parametrize("ci", [None, *CI_FILES])
def test_every_pod_runs_hardened(ci):
    docs = rendered(ci)
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    for group, p in pods(docs).items():
        spec = p["spec"]
        assert spec["automountServiceAccountToken"] is False, group
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"]
                    if not m.get("readOnly")}
        if group == "redis":
            assert list(writable) == ["/data"]
        else:
            assert set(writable) == {"/tmp", "/home/ray/.cache", "/dev/shm"}, (group, writable)
            assert all("emptyDir" in vols[name] for name in writable.values())
            assert spec["securityContext"]["runAsUser"] == 1000  # the images' user `ray`
            assert "readinessProbe" not in container  # KubeRay's own (see rayServe values)
            assert ("kube-api-access" in vols) == (group == "head" and cluster[
                "enableInTreeAutoscaling"]), group
            assert all(m["name"] != "kube-api-access" for m in container["volumeMounts"])
    # The one exception, documented in rayservice.yaml: the autoscaler container calls the
    # Kubernetes API, and gets the head's token alone.
    if cluster["enableInTreeAutoscaling"]:
        opts = cluster["autoscalerOptions"]
        assert {m["name"]: m["mountPath"] for m in opts["volumeMounts"]} == {
            "kube-api-access": "/var/run/secrets/kubernetes.io/serviceaccount", "tmp": "/tmp"}
        assert opts["securityContext"]["readOnlyRootFilesystem"] is True
    assert yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])["proxy_location"] == (
        "EveryNode")


def secret_env(docs) -> dict[str, set[str]]:
    """Each secret-backed env var (and the API-key file) -> the groups whose pods get it."""
    out: dict[str, set[str]] = {}
    for group, p in pods(docs).items():
        (container,) = p["spec"]["containers"]
        for e in container.get("env", []):
            if "valueFrom" in e:
                out.setdefault(e["name"], set()).add(group)
        if any(m["name"] == "api-keys" for m in container["volumeMounts"]):
            out.setdefault("api-keys file", set()).add(group)
    return out


def test_each_secret_reaches_exactly_the_pods_that_read_it():
    docs = rendered(secrets__apiKeys__enabled=True, secrets__apiKeys__keys=["tenant-key-1"])
    assert secret_env(docs) == {
        "ZAYASERVE_KV_CACHE_SECRET": {"head", "attention"},  # build_app + the L2 tier
        "ZAYASERVE_RPC_TOKEN": {"head"},  # build_app, which binds it into shards and workers
        "ZAYASERVE_ADMIN_API_KEY": {"head"},  # the ingress
        "ZAYASERVE_REDIS_PASSWORD": {"attention"},  # the L2 tier's Redis client
        "REDISCLI_AUTH": {"redis"},  # redis-server --requirepass and the probe
        "api-keys file": {"head"},  # the ingress
    }
    for p in pods(docs).values():  # every reference resolves to a rendered Secret
        pod_env(p["spec"]["containers"][0], docs)
    # The names the code reads.
    code = "".join(p.read_text() for d in ("cluster", "replicas") for p in (REPO / d).rglob("*.py"))
    for var in ("ZAYASERVE_KV_CACHE_SECRET", "ZAYASERVE_RPC_TOKEN", "ZAYASERVE_ADMIN_API_KEY",
                "ZAYASERVE_REDIS_PASSWORD"):
        assert f'"{var}"' in code, var
    admin = {s["metadata"]["name"]: s for s in kinds(docs, "Secret")}["zs-zayaserve-admin-key"]
    assert len(base64.b64decode(admin["data"]["admin-key"])) == 64
    # existingSecret overrides; off switches; an external Redis with and without a password.
    docs = rendered("external-redis", secrets__adminKey__existingSecret="existing-admin",
                    redis__auth__existingSecret="existing-redis")
    env = secret_env(docs)
    assert env["ZAYASERVE_REDIS_PASSWORD"] == {"attention"} and "REDISCLI_AUTH" not in env
    heads = pods(docs)["head"]["spec"]["containers"][0]["env"]
    assert {"name": "existing-admin", "key": "admin-key"} in [
        e["valueFrom"]["secretKeyRef"] for e in heads if "valueFrom" in e]
    assert not {"zs-zayaserve-admin-key", "zs-zayaserve-redis-auth"} & {
        s["metadata"]["name"] for s in kinds(docs, "Secret")}
    env = secret_env(rendered("external-redis", secrets__adminKey__enabled=False))
    assert "ZAYASERVE_REDIS_PASSWORD" not in env and "ZAYASERVE_ADMIN_API_KEY" not in env
    assert "ZAYASERVE_REDIS_PASSWORD" not in secret_env(rendered(redis__auth__enabled=False))


def test_notes_tell_how_to_read_the_admin_key():
    notes = helm("install", RELEASE, str(CHART_DIR), "--dry-run=client", "-n", "zs-ns").stdout
    assert ("kubectl -n zs-ns get secret zs-zayaserve-admin-key \\\n       -o jsonpath="
            "'{.data.admin-key}' | base64 -d") in notes
    assert "zayaserve scale --expert-shards N" in notes and "--api-key" not in notes
    assert "maxUnavailable 0" in notes  # expert_replication 1: drains wait


needs_redis = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                 reason="redis-server / redis-cli not installed")


@needs_redis
@pytest.mark.redis
def test_bundled_redis_requires_the_password_the_workers_send(tmp_path: Path, monkeypatch):
    from test_redis_store import HASHES, PAYLOADS, RedisServer

    from zayaserve.replicas.kv_tiers.redis_store import RedisBlockStore

    docs = rendered()
    (sts,) = kinds(docs, "StatefulSet")
    (redis_c,) = sts["spec"]["template"]["spec"]["containers"]
    args = redis_c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDISCLI_AUTH)"
    assert redis_c["readinessProbe"]["exec"]["command"] == [
        "sh", "-c", "redis-cli ping | grep -qx PONG"]
    password = pod_env(redis_c, docs)["REDISCLI_AUTH"]
    assert len(password) == 64
    attention_env = pod_env(pods(docs)["attention"]["spec"]["containers"][0], docs)
    assert attention_env["ZAYASERVE_REDIS_PASSWORD"] == password
    url = app_args(rayservice(docs))["engine"]["kv_cache_redis_url"]
    assert url == "redis://zs-redis:6379/0"  # no password in the (visible) Serve config
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        local = f"redis://127.0.0.1:{server.port}/0"
        # The probe, on this server's port; redis-cli exits 0 even on NOAUTH, so it greps PONG.
        sh, c, script = redis_c["readinessProbe"]["exec"]["command"]
        probe = [sh, c, script.replace("redis-cli", f"redis-cli -p {server.port}")]
        env = {**os.environ, "REDISCLI_AUTH": password}
        no_auth = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        for run_env, ok in ((env, True), (no_auth, False), ({**env, "REDISCLI_AUTH": "x"}, False)):
            assert (subprocess.run(probe, env=run_env, capture_output=True).returncode == 0) == ok
        monkeypatch.setenv("ZAYASERVE_REDIS_PASSWORD", attention_env["ZAYASERVE_REDIS_PASSWORD"])
        with RedisBlockStore(local) as store:
            assert store.put_async(HASHES[0], PAYLOADS[0]) and store.flush()
            assert store.get_many(HASHES[:1]) == PAYLOADS[:1] and store.stats.errors == 0
        monkeypatch.setenv("ZAYASERVE_REDIS_PASSWORD", "wrong")
        with RedisBlockStore(local, timeout_s=0.2) as store:
            assert store.get_many(HASHES[:1]) == [None] and store.stats.errors == 1
    finally:
        server.stop()
    off = kinds(rendered(redis__auth__enabled=False), "StatefulSet")[0]["spec"]["template"]
    assert "--requirepass" not in off["spec"]["containers"][0]["args"]


@pytest.mark.parametrize("ci, values, want", [
    (None, {}, 0),  # expert_replication 1: no expert pod may go
    (None, {"serve__expert_replication": 2}, 1),
    (None, {"serve__expert_replication": 3, "serve__expert_shards": 3}, 2),
    ("amd", {}, 0),  # replication 2, but two shards (GPUs) per pod: both copies may share one
    ("cpu-only", {"serve__expert_replication": 2}, 0),  # 2 CPUs / 0.5 per shard: 4 per pod
    (None, {"serve__expert_replication": 2, "experts__podDisruptionBudget__maxUnavailable": 3}, 3),
])
def test_expert_pdb_follows_expert_replication(ci, values, want):
    pdbs = {p["metadata"]["name"]: p["spec"] for p in kinds(rendered(ci, **values),
                                                             "PodDisruptionBudget")}
    assert pdbs["zs-zayaserve-experts"]["maxUnavailable"] == want
    assert pdbs["zs-zayaserve-attention"]["maxUnavailable"] == 1
