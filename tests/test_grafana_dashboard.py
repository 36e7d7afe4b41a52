"""The Grafana dashboard (helm/zayaserve/dashboards/zayaserve.json, linked from deploy/grafana/)
and the chart values around observability: the dashboard's ConfigMap for Grafana's sidecar and
the OTEL_* tracing variables of every Ray container, rendered by a real helm."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import kubernetes_validate
import pytest
from helm_tools import CHART_DIR, RELEASE, helm, kinds, pod_templates, rayservice, rendered

REPO = CHART_DIR.parents[1]
DASHBOARD = CHART_DIR / "dashboards" / "zayaserve.json"
DEPLOY_LINK = REPO / "deploy" / "grafana" / "zayaserve-dashboard.json"
METRICS_DOC = REPO / "docs" / "observability.md"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"zayaserve_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
CONFIGMAP = f"{RELEASE}-zayaserve-dashboard"
TRACING = {"tracing.otlpEndpoint": "http://otel:4317",
           "tracing.otlpMetricsEndpoint": "http://otel-metrics:4317",
           "tracing.sampler": "parentbased_traceidratio", "tracing.samplerArg": "0.1"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """Every panel, rows and the panels inside collapsed rows included."""
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def graphs(dash: dict) -> list[dict]:
    return [p for p in panels(dash) if p["type"] != "row"]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in graphs(dash) for t in p["targets"]]


# ---- the JSON ---------------------------------------------------------------------------------

def test_dashboard_identity_and_datasource_variable():
    dash = dashboard()
    assert (dash["uid"], dash["title"], dash["tags"]) == ("zayaserve", "zayaserve", ["zayaserve"])
    assert dash["schemaVersion"] >= 36 and dash["id"] is None
    assert dash["time"] == {"from": "now-1h", "to": "now"}
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "datasource"]
    assert (var["type"], var["query"]) == ("datasource", "prometheus")
    assert "__inputs" not in dash  # imports as it is: no ${DS_...} placeholders to fill


def test_dashboard_is_pretty_printed():
    text = DASHBOARD.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_panels_have_unique_ids_a_place_and_a_query():
    dash = dashboard()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels(dash):
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    for panel in graphs(dash):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty expr"
            assert target.get("datasource", DATASOURCE) == DATASOURCE, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_rows_and_panel_kinds():
    dash = dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Engine", "Experts", "Cluster"]
    by_kind = {p["type"] for p in graphs(dash)}
    assert by_kind == {"timeseries", "stat"}
    stats = {t["expr"] for p in graphs(dash) if p["type"] == "stat" for t in p["targets"]}
    assert stats == {"zayaserve_expert_balancedness", "zayaserve_attention_workers_live",
                     "zayaserve_expert_shards_live", "zayaserve_placement_epoch"}
    (kv,) = [p for p in graphs(dash)
             if any("zayaserve_kv_cache_usage_perc" in t["expr"] for t in p["targets"])]
    assert kv["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_every_metric_is_in_the_docs_table():
    readme = METRICS_DOC.read_text()
    used = {m for expr in exprs(dashboard()) for m in METRIC.findall(expr)}
    assert len(used) > 20
    missing = []
    for name in sorted(used):
        names = {name} | {name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)}
        if not any(f"`{n}`" in readme for n in names):
            missing.append(name)
    assert not missing, f"not in docs/observability.md's metrics table: {missing}"


def test_deploy_copy_is_a_relative_symlink_to_the_chart_file():
    assert DEPLOY_LINK.is_symlink()
    target = os.readlink(DEPLOY_LINK)
    assert not os.path.isabs(target), target
    assert DEPLOY_LINK.resolve() == DASHBOARD.resolve()


# ---- the chart --------------------------------------------------------------------------------

def dashboard_configmaps(docs) -> list[dict]:
    return [d for d in kinds(docs, "ConfigMap") if d["metadata"]["name"] == CONFIGMAP]


def test_no_dashboard_configmap_by_default():
    assert dashboard_configmaps(rendered()) == []


def test_dashboard_configmap_for_the_grafana_sidecar():
    (cm,) = dashboard_configmaps(rendered(grafana__dashboard__enabled=True))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert "namespace" not in cm["metadata"]  # the release's
    assert set(cm["data"]) == {"zayaserve.json"}
    assert json.loads(cm["data"]["zayaserve.json"]) == dashboard()
    # Small enough for client-side `kubectl apply` (its last-applied annotation, 256 KiB).
    assert len(cm["data"]["zayaserve.json"]) < 256 * 1024
    kubernetes_validate.validate(cm, "1.35.0", strict=True)


def test_dashboard_configmap_namespace_labels_and_annotations():
    (cm,) = dashboard_configmaps(rendered(
        grafana__dashboard__enabled=True, grafana__dashboard__namespace="monitoring",
        grafana__dashboard__labels={"grafana_dashboard": None, "dashboards": "zayaserve"},
        grafana__dashboard__annotations={"grafana_folder": "LLM"}))
    meta = cm["metadata"]
    assert meta["namespace"] == "monitoring"
    assert meta["labels"]["dashboards"] == "zayaserve" and "grafana_dashboard" not in meta["labels"]
    assert meta["annotations"] == {"grafana_folder": "LLM"}


def ray_containers(docs) -> dict[str, dict]:
    """'<group>/<container>' -> container, for every container of the head and worker groups."""
    templates = pod_templates(rayservice(docs))
    assert set(templates) == {"head", "attention", "experts"}
    return {f"{group}/{c['name']}": c for group, tmpl in templates.items()
            for c in tmpl["spec"]["containers"]}


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_no_tracing_variables_by_default():
    for name, container in ray_containers(rendered()).items():
        assert not [k for k in env_of(container) if k.startswith("OTEL_")], name


@pytest.mark.parametrize("sampler_arg", ["0.1", 0.1])
def test_tracing_variables_in_every_ray_container(sampler_arg):
    values = {k.replace(".", "__"): v for k, v in TRACING.items()}
    docs = rendered(**{**values, "tracing__samplerArg": sampler_arg},
                    extraEnv=[{"name": "EXTRA", "value": "1"}])
    containers = ray_containers(docs)
    assert len(containers) >= 3
    for name, container in containers.items():
        env = env_of(container)
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://otel:4317", name
        assert env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] == "http://otel-metrics:4317", name
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio", name
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1", name
        assert "OTEL_SERVICE_NAME" not in env, name
        assert env["EXTRA"] == "1", name  # extraEnv still there


def test_tracing_service_name_and_a_zero_ratio():
    docs = rendered(tracing__otlpEndpoint="https://otel:4317", tracing__serviceName="zs-prod",
                    tracing__sampler="traceidratio", tracing__samplerArg=0)
    for name, container in ray_containers(docs).items():
        env = env_of(container)
        assert env["OTEL_SERVICE_NAME"] == "zs-prod", name
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0", name


def test_tracing_variables_are_what_zayaserve_reads():
    """The rendered variables resolve, in zayaserve's own TracingConfig, to what was set."""
    from zayaserve.replicas.observability.tracing import TracingConfig

    (head,) = [c for name, c in ray_containers(rendered(
        **{k.replace(".", "__"): v for k, v in TRACING.items()},
        tracing__serviceName="zs")).items() if name.startswith("head/")]
    env = {k: v for k, v in env_of(head).items() if k.startswith("OTEL_")}
    cfg = TracingConfig().resolved(env)
    assert (cfg.otlp_traces_endpoint, cfg.sampler, cfg.sampler_arg, cfg.service_name,
            cfg.otlp_metrics_endpoint) == (
        "http://otel:4317", "parentbased_traceidratio", 0.1, "zs", "http://otel-metrics:4317")


def test_schema_sampler_enum_is_zayaserves():
    from zayaserve.replicas.observability.tracing import Sampler

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    enum = schema["properties"]["tracing"]["properties"]["sampler"]["enum"]
    assert sorted(enum) == sorted(["", *Sampler.__args__])


@pytest.mark.parametrize("bad, message", [
    ("tracing.sampler=sometimes", "/tracing/sampler"),
    ("tracing.samplerArg=1.5", "/tracing/samplerArg"),
    ("tracing.otlpEndpoint=otel:4317", "/tracing/otlpEndpoint"),
    ("tracing.endpoint=http://otel:4317", "endpoint"),
    ("grafana.dashboard.enabeld=true", "enabeld"),
    ("grafana.dashboard.labels.grafana_dashboard=1", "/grafana/dashboard/labels"),
])
def test_bad_observability_values_are_refused(bad, message):
    done = helm("template", RELEASE, str(CHART_DIR), "--set", bad, check=False)
    assert done.returncode != 0, f"helm template accepted --set {bad}"
    assert message in done.stdout + done.stderr, done.stderr


def test_the_chart_packages_the_dashboard(tmp_path: Path):
    """`helm package` keeps dashboards/ (no .helmignore drops it), so an installed chart has it."""
    helm("package", str(CHART_DIR), "-d", str(tmp_path))
    (archive,) = tmp_path.glob("zayaserve-*.tgz")
    with tarfile.open(archive) as tar:
        member = tar.extractfile("zayaserve/dashboards/zayaserve.json")
        assert member is not None and json.loads(member.read()) == dashboard()
