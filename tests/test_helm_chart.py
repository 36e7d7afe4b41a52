"""The Helm chart (helm/zayaserve), rendered by a real helm and checked against the real schemas:
Kubernetes' own (kubernetes-validate), KubeRay's RayService CRD, Ray Serve's config schema,
zayaserve's ClusterConfig, and what Ray's autoscaler reads from the worker groups."""

from __future__ import annotations

import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_tools import (
    CHART_DIR,
    CI_DIR,
    CI_FILES,
    RELEASE,
    helm,
    pod_templates,
    rayservice,
    rayservice_validator,
    rendered,
    serve_config,
    value_args,
)

K8S_VERSIONS = ["1.33.0", "1.35.0"]
BUILTIN_APIS = {"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"}


# ---- lint and render -------------------------------------------------------------------------

def test_ci_matrix_is_complete():
    assert sorted(p.name for p in CI_DIR.glob("*-values.yaml")) == sorted(
        f"{name}-values.yaml" for name in CI_FILES)


@pytest.mark.parametrize("ci", [None, *CI_FILES])
def test_lint_strict_and_template(ci):
    files = [CI_DIR / f"{ci}-values.yaml"] if ci else []
    done = helm("lint", "--strict", str(CHART_DIR), *value_args(files))
    assert "0 chart(s) failed" in done.stdout
    assert {"RayService", "Service", "Secret"} <= {d["kind"] for d in rendered(ci)}


@pytest.mark.parametrize("bad, message", [
    ("attention.replicas=two", "/attention/replicas"),
    ("gpu.vendor=intel", "/gpu/vendor"),
    ("replicaCount=3", "replicaCount"),
    ("serve.engine.block_sise=8", "block_sise"),
])
def test_bad_values_are_rejected(bad, message):
    for command in (["lint", "--strict"], ["template", RELEASE]):
        done = helm(*command, str(CHART_DIR), "--set", bad, check=False)
        assert done.returncode != 0, f"helm {command[0]} accepted --set {bad}"
        assert message in done.stdout + done.stderr


@pytest.mark.parametrize("bad, message", [
    ({"redis.mode": "external"}, "set redis.url"),
    ({"upgradeStrategy.type": "NewClusterWithIncrementalUpgrade",
      "upgradeStrategy.clusterUpgradeOptions.gatewayClassName": "istio",
      "rayAutoscaler.enabled": False}, "needs rayAutoscaler.enabled"),
    ({"attention.minReplicas": 3}, "minReplicas (3) <= replicas (2)"),
    ({"serve.attention_workers": 9}, "needs more GPUs"),
    ({"gpu.vendor": "none", "serve.expert_num_gpus": 1}, "experts pods have no GPU"),
    ({"model.path": "zaya1-8b"}, "absolute path"),
])
def test_inconsistent_values_fail_with_a_clear_message(bad, message):
    done = helm("template", RELEASE, str(CHART_DIR), *value_args((), bad), check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_kubernetes_older_than_1_29_is_refused():
    assert helm("template", RELEASE, str(CHART_DIR), "--kube-version", "1.29.0").returncode == 0
    done = helm("template", RELEASE, str(CHART_DIR), "--kube-version", "1.28.9", check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr


# ---- schemas ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_against_kubernetes(version):
    checked = set()
    for ci in CI_FILES:
        docs = rendered(ci)
        # The Ray pod templates, as the core API's own PodTemplate.
        docs += [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                  "template": tmpl} for name, tmpl in pod_templates(rayservice(docs)).items()]
        for doc in docs:
            if doc["apiVersion"] in BUILTIN_APIS:
                kubernetes_validate.validate(doc, version, strict=True)
                checked.add(doc["kind"])
    assert checked >= {"Service", "Secret", "StatefulSet", "PodDisruptionBudget",
                       "NetworkPolicy", "Ingress", "PodTemplate"}


@pytest.mark.parametrize("ci", CI_FILES)
def test_rayservice_matches_the_kuberay_crd(ci):
    rs = rayservice(rendered(ci))
    assert rs["apiVersion"] == "ray.io/v1"
    rayservice_validator().validate(rs)


@pytest.mark.parametrize("path, value", [
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0,
      "gpus"), 1),
    (("spec", "rayClusterConfig", "enableAutoscaling"), True),
    (("spec", "upgradeStrategy", "steps"), 3),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "2"),
])
def test_the_crd_check_refuses_unknown_fields_and_wrong_types(path, value):
    rs = rayservice(rendered())
    node = rs
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        rayservice_validator().validate(rs)


@pytest.mark.parametrize("ci", CI_FILES)
def test_serve_config_is_valid_for_ray_serve_and_zayaserve(ci):
    from ray.serve.schema import ServeDeploySchema

    from zayaserve.cluster.config import ClusterConfig

    rs = rayservice(rendered(ci))
    assert isinstance(rs["spec"]["serveConfigV2"], str)
    deploy = ServeDeploySchema.model_validate(serve_config(rs))
    (app,) = deploy.applications
    assert (app.name, app.import_path, app.route_prefix) == (
        "zayaserve", "zayaserve.cluster.app:build_app", "/")
    cfg = ClusterConfig.create(**app.args)
    assert cfg.model == yaml.safe_load((CI_DIR / f"{ci}-values.yaml").read_text()).get(
        "model", {}).get("path", "/models/zaya1-8b")
    assert app.args["attention_ray_resources"] == {"zayaserve_attention": 1}
    assert app.args["expert_ray_resources"] == {"zayaserve_experts": 1}
    assert app.args["ingress_ray_resources"] == {"zayaserve_head": 1}


def test_values_schema_mirrors_cluster_config():
    """Every serve: key the schema allows is a ClusterConfig field, and every field is in the
    schema unless the chart sets it itself (or it holds a secret)."""
    from zayaserve.cluster.config import ClusterConfig
    from zayaserve.replicas.engine.config import RequestLimits

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())["definitions"]
    cluster = schema["clusterConfig"]["properties"]
    pairs = [
        # tracing: the chart's own `tracing:` values, as OTEL_* variables of every container.
        # admin_api_key(_file): secrets.adminKey, as $ZAYASERVE_ADMIN_API_KEY of the head.
        (cluster, ClusterConfig, {"model", "api_key", "api_key_file", "attention_ray_resources",
                                  "expert_ray_resources", "ingress_ray_resources", "tracing",
                                  "admin_api_key", "admin_api_key_file"}),
        (schema["engineSettings"]["properties"], ClusterConfig.model_fields["engine"].annotation,
         {"kv_cache_secret"}),
        (cluster["autoscaling"]["properties"],
         ClusterConfig.model_fields["autoscaling"].annotation, set()),
        (cluster["eplb"]["properties"], ClusterConfig.model_fields["eplb"].annotation, set()),
        (schema["engineSettings"]["properties"]["limits"]["properties"], RequestLimits, set()),
    ]
    for props, model, chart_owned in pairs:
        fields = set(model.model_fields)
        assert set(props) <= fields, f"{model.__name__}: not fields {set(props) - fields}"
        assert fields - chart_owned <= set(props), (
            f"{model.__name__}: add {fields - chart_owned - set(props)} to values.schema.json")
