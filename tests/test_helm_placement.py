"""The Helm chart's placement of zayaserve on Kubernetes, rendered by a real helm: GPU
resources by vendor (amd.com/gpu on MI300X nodes, nvidia.com/gpu, none), each Serve deployment
on its own Ray worker group (as Ray's autoscaler reads the groups), the Services, disruption
budgets and network policies selecting the right pods, and secrets kept out of the Serve
config."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from helm_tools import (
    CI_DIR,
    CI_FILES,
    app_args,
    kinds,
    matches,
    pod_templates,
    rayservice,
    rendered,
)

VISIBLE_DEVICES = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


# ---- accelerators and Ray placement ----------------------------------------------------------

@pytest.mark.parametrize("ci, resource, suffix", [
    ("amd", "amd.com/gpu", "rocm"), ("nvidia", "nvidia.com/gpu", "cuda"),
    ("cpu-only", None, "cpu")])
def test_gpu_resources_by_vendor(ci, resource, suffix):
    values = yaml.safe_load((CI_DIR / f"{ci}-values.yaml").read_text())
    for name, tmpl in pod_templates(rayservice(rendered(ci))).items():
        (container,) = tmpl["spec"]["containers"]
        assert container["image"] == f"ghcr.io/zyphra/zayaserve:0.1.0-{suffix}"
        res = container["resources"]
        gpu_keys = {k for part in res.values() for k in part if "gpu" in k}
        if resource and name != "head":
            want = str(values[name]["gpusPerPod"])
            assert res["requests"][resource] == res["limits"][resource] == want
            assert gpu_keys == {resource}
        else:
            assert not gpu_keys, f"{name}: {gpu_keys}"
        selector = tmpl["spec"].get("nodeSelector", {})
        mi300x = selector.get("amd.com/gpu.product-name") == "AMD_Instinct_MI300X_OAM"
        assert mi300x == (ci == "amd" and name != "head")


def test_ray_never_gets_visible_devices_from_the_chart():
    for ci in [None, *CI_FILES]:
        text = yaml.safe_dump_all(rendered(ci))
        assert not [v for v in VISIBLE_DEVICES if v in text], ci


@pytest.mark.parametrize("ci", CI_FILES)
def test_each_deployment_lands_on_its_own_group(ci):
    """What Ray's autoscaler reads from the groups (the same parser it runs in the cluster):
    the head offers no CPU or GPU; each group offers its deployment's resource and GPUs."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    rs = rayservice(rendered(ci))
    cr = {"metadata": {"name": "zs", "namespace": "zayaserve"},
          "spec": rs["spec"]["rayClusterConfig"]}
    nodes = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    head = nodes["headgroup"]["resources"]
    assert head["CPU"] == 0 and head.get("GPU", 0) == 0
    args = app_args(rs)
    for group, field in [("attention", "attention_ray_resources"),
                         ("experts", "expert_ray_resources"),
                         ("headgroup", "ingress_ray_resources")]:
        (custom,) = args[field]  # the ingress (gRPC server) follows the Service to the head
        for node, spec in nodes.items():
            assert (custom in spec["resources"]) == (node == group), (node, custom)
    for group, gpus in [("attention", "attention_num_gpus"), ("experts", "expert_num_gpus")]:
        assert args[gpus] <= nodes[group]["resources"].get("GPU", 0)
        assert args[gpus] == (0 if ci == "cpu-only" else 1)


def test_explicit_num_gpus_win():
    args = app_args(rayservice(rendered(serve__attention_num_gpus=0.5)))
    assert (args["attention_num_gpus"], args["expert_num_gpus"]) == (0.5, 1)


# ---- services, policies, secrets -------------------------------------------------------------

def test_service_selects_the_serving_head():
    docs = rendered("nvidia")
    (svc,) = [s for s in kinds(docs, "Service") if s["metadata"]["name"] == "zs-zayaserve"]
    templates = pod_templates(rayservice(docs))
    selector = svc["spec"]["selector"]
    assert selector["ray.io/serve"] == "true" and selector["ray.io/node-type"] == "head"
    kuberay_labels = {"ray.io/serve": "true", "ray.io/node-type": "head"}
    assert matches(selector, {**templates["head"]["metadata"]["labels"], **kuberay_labels})
    for group in ("attention", "experts"):
        assert not matches(selector, {**templates[group]["metadata"]["labels"], **kuberay_labels})
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {n: (p["port"], p["protocol"], p["appProtocol"]) for n, p in ports.items()} == {
        "http": (8000, "TCP", "http"), "grpc": (9000, "TCP", "grpc")}
    head_ports = {p["name"] for p in templates["head"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in ports.values()} <= head_ports


def test_pdbs_and_network_policies_select_the_right_pods():
    docs = rendered()
    labels = {n: t["metadata"]["labels"] for n, t in pod_templates(rayservice(docs)).items()}
    labels["redis"] = kinds(docs, "StatefulSet")[0]["spec"]["template"]["metadata"]["labels"]
    labels["stranger"] = {"app": "something-else"}
    for pdb in kinds(docs, "PodDisruptionBudget"):
        group = pdb["metadata"]["name"].rsplit("-", 1)[1]
        assert {n for n, lab in labels.items() if matches(pdb["spec"]["selector"], lab)} == {group}
    policies = {p["metadata"]["name"]: p["spec"] for p in kinds(docs, "NetworkPolicy")}
    experts = policies["zs-zayaserve-experts"]
    assert [n for n, lab in labels.items() if matches(experts["podSelector"], lab)] == ["experts"]
    (rule,) = experts["ingress"]
    assert rule["ports"] == [{"protocol": "TCP"}]  # every TCP port
    allowed = {n for n, lab in labels.items() if any(matches(p["podSelector"], lab)
                                                     for p in rule["from"])}
    assert allowed == {"head", "attention", "experts"}
    head = policies["zs-zayaserve-head"]
    public = [r for r in head["ingress"] if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in public] == [[8000, 9000]]


def test_secrets_reach_containers_and_never_the_serve_config():
    cache_secret, api_key = "kv-cache-sentinel-0123456789", "api-key-sentinel-42"
    docs = rendered(secrets__kvCache__value=cache_secret, secrets__apiKeys__enabled=True,
                    secrets__apiKeys__keys=[api_key, "second-key"])
    rs = rayservice(docs)
    assert cache_secret not in json.dumps(rs) and api_key not in json.dumps(rs)
    data = {s["metadata"]["name"]: s["data"] for s in kinds(docs, "Secret")}
    assert base64.b64decode(data["zs-zayaserve-kv-cache"]["secret"]).decode() == cache_secret
    keys = base64.b64decode(data["zs-zayaserve-api-keys"]["api-keys"]).decode()
    assert keys.splitlines() == [api_key, "second-key"]
    assert app_args(rs)["api_key_file"] == "/etc/zayaserve/api-keys/api-keys"
    # Each secret only where it is read (tests/test_helm_security.py checks every variable).
    for group, tmpl in pod_templates(rs).items():
        (container,) = tmpl["spec"]["containers"]
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
               if "valueFrom" in e}
        assert (env.get("ZAYASERVE_KV_CACHE_SECRET") == {
            "name": "zs-zayaserve-kv-cache", "key": "secret"}) == (group != "experts")
        assert all(ref["name"] in data for ref in env.values())
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        if group == "head":
            assert mounts["api-keys"] == "/etc/zayaserve/api-keys"
            assert vols["api-keys"]["secret"]["secretName"] == "zs-zayaserve-api-keys"
        else:
            assert "api-keys" not in mounts and "api-keys" not in vols
        assert vols["shm"]["emptyDir"]["medium"] == "Memory"


def test_redis_modes():
    bundled = rendered()
    (sts,) = kinds(bundled, "StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--save") + 1] == "" and "volumeClaimTemplates" not in sts["spec"]
    assert app_args(rayservice(bundled))["engine"]["kv_cache_redis_url"] == "redis://zs-redis:6379/0"
    (sts,) = kinds(rendered("amd"), "StatefulSet")
    assert "--save" not in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "50Gi"}
    external = rendered("external-redis")
    assert not kinds(external, "StatefulSet")
    assert app_args(rayservice(external))["engine"]["kv_cache_redis_url"] == (
        "rediss://redis.cache.svc.cluster.local:6380/2")
    none = rayservice(rendered("cpu-only"))
    assert "kv_cache_redis_url" not in app_args(none).get("engine", {})
    assert "ZAYASERVE_KV_CACHE_SECRET" not in json.dumps(none)


@pytest.mark.parametrize("ci, source", [("amd", "persistentVolumeClaim"),
                                        ("nvidia", "hostPath"), ("cpu-only", None)])
def test_model_volume_in_every_ray_pod(ci, source):
    for tmpl in pod_templates(rayservice(rendered(ci))).values():
        vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
        mounts = {m["name"]: m for m in tmpl["spec"]["containers"][0]["volumeMounts"]}
        if source is None:
            assert "model" not in vols and "model" not in mounts
            continue
        assert source in vols["model"]
        assert mounts["model"] == {"name": "model", "mountPath": "/models", "readOnly": True}


def test_upgrade_strategy_and_autoscaler():
    spec = rayservice(rendered("incremental-upgrade"))["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewClusterWithIncrementalUpgrade",
                                       "clusterUpgradeOptions": {
                                           "gatewayClassName": "istio", "stepSizePercent": 10,
                                           "intervalSeconds": 30, "maxSurgePercent": 50}}
    assert rayservice(rendered())["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    on = rayservice(rendered("autoscaling-on"))["spec"]["rayClusterConfig"]
    assert on["enableInTreeAutoscaling"] is True
    assert on["autoscalerOptions"]["upscalingMode"] == "Conservative"
    assert on["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    off = rayservice(rendered("autoscaling-off"))["spec"]["rayClusterConfig"]
    assert off["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in off


def test_crd_backed_kinds_only_when_enabled_and_httproute_version():
    assert not {"PodMonitor", "ServiceMonitor", "HTTPRoute"} & {d["kind"] for d in rendered()}
    assert kinds(rendered("amd"), "PodMonitor") and kinds(rendered("nvidia"), "ServiceMonitor")
    (route,) = kinds(rendered("nvidia"), "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    only_beta = ("--api-versions", "gateway.networking.k8s.io/v1beta1/HTTPRoute")
    (route,) = kinds(rendered("nvidia", extra=only_beta), "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1beta1"
