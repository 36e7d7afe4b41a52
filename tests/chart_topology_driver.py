"""The Helm chart's Ray topology on this machine, for tests/test_chart_topology.py.

`make_plan(docs)` reads the rendered chart into a plan: one Ray node per group with its
`ray start` parameters (as KubeRay derives them) and its pod's environment, the dashboard's
ports, the Serve config to PUT; the test adds the REST requests to send. `python
chart_topology_driver.py PLAN.json` runs it: starts the nodes with `ray.cluster_utils.Cluster`,
deploys the config the way KubeRay does (PUT /api/serve/applications/ to the head's dashboard,
token in `x-ray-authorization`), waits for the app, collects what the test checks and prints it
as one JSON line after RESULT_PREFIX, then shuts every node down. It asserts nothing itself:
any error is reported in the result.

The environment it is started with is every Ray process's (RAY_TMPDIR, RAY_AUTH_MODE,
RAY_AUTH_TOKEN, ZAYASERVE_HOME); each node's raylet, and so its workers, also get `env`."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from helm_tools import kinds, pod_templates, rayservice, serve_config
from plain_venv import free_ports

RESULT_PREFIX = "CHART_TOPOLOGY_RESULT "
APPS = "/api/serve/applications/"
FAILED_APP_STATES = {"DEPLOY_FAILED", "UNHEALTHY"}

# One machine, not three pods: a small object store each (Ray would otherwise size each
# node's store from the whole machine's memory; nothing here passes large objects).
OBJECT_STORE_BYTES = 100 * 2**20
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(text: str) -> float:
    """A Kubernetes resource quantity ("2", "500m", "4Gi") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert m and m.group(2) in _UNITS, f"unparsed quantity {text!r}"
    return float(m.group(1)) * _UNITS[m.group(2)]


def ray_node_params(start_params: dict[str, str], container: dict[str, Any]) -> dict[str, Any]:
    """Ray node arguments from a group's rayStartParams, as KubeRay starts the pod: each
    becomes `--key=value` on a shell command line (so KubeRay's quoted JSON is unquoted by the
    shell); num-cpus, num-gpus and memory it does not set come from the container's limits."""
    argv = shlex.split(" ".join(f"--{k}={v}" for k, v in start_params.items()))
    params: dict[str, Any] = {}
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key in ("num-cpus", "num-gpus", "memory"):
            params[key.replace("-", "_")] = int(value)
        elif key == "resources":
            params["resources"] = json.loads(value)
        elif key == "dashboard-host":
            params["dashboard_host"] = value
        else:
            raise AssertionError(f"rayStartParams {key}={value}: not known to this test; "
                                 "teach ray_node_params how `ray start` takes it")
    limits = container["resources"]["limits"]
    params.setdefault("num_cpus", math.ceil(_quantity(limits["cpu"])))
    params.setdefault("num_gpus", sum(int(v) for k, v in limits.items() if k.endswith("/gpu")))
    params.setdefault("memory", int(_quantity(limits["memory"])))
    return params


def pod_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment, Secret references resolved from the rendered Secrets."""
    secrets_by_name = {s["metadata"]["name"]: s for s in kinds(docs, "Secret")}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        secret = secrets_by_name.get(ref["name"])
        assert secret is not None, f"env {var['name']}: Secret {ref['name']} is not rendered"
        plain = secret.get("stringData", {}).get(ref["key"])
        env[var["name"]] = plain or base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def make_plan(docs: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """What to start and deploy, from the chart's rendered manifests; `requests` (path and
    body, by name) are the caller's to add."""
    rs = rayservice(docs)
    cluster = rs["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"],
             **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    assert set(specs) == {"head", "attention", "experts"}, sorted(specs)
    pods = pod_templates(rs)
    dash_port, agent_port, http_port, grpc_port = free_ports(4)
    nodes = []
    for group, spec in specs.items():
        assert spec.get("replicas", 1) == 1, f"{group}: the test starts one node per group"
        (container,) = pods[group]["spec"]["containers"]
        params = ray_node_params(spec["rayStartParams"], container)
        params["object_store_memory"] = OBJECT_STORE_BYTES
        if group == "head":
            # `ray start --head` runs the dashboard (KubeRay's way in); three "pods" share
            # this machine's ports, so free ones instead of Ray's 8265 / 52365.
            params.update(include_dashboard=True, dashboard_port=dash_port,
                          dashboard_agent_listen_port=agent_port)
        nodes.append({"group": group, "params": params, "env": pod_env(container, docs)})
    config = serve_config(rs)
    (app,) = config["applications"]
    # Free ports instead of the rendered 8000 / 9000 (each pod has its own; here other tests
    # may hold them). The proxies of all three nodes bind the same HTTP port, as in the pods:
    # Serve sets SO_REUSEPORT, so on one machine they share it.
    config["http_options"]["port"] = app["args"]["http_port"] = http_port
    app["args"]["grpc_port"] = grpc_port
    model = app["args"].get("served_model_name") or Path(app["args"]["model"]).name
    return {
        "nodes": nodes, "serve_config": config, "app_name": app["name"],
        "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "serve_url": f"http://127.0.0.1:{http_port}", "timeout_s": timeout_s, "model": model,
    }


def log(msg: str) -> None:
    print(f"[chart-topology {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start_nodes(plan: dict[str, Any], result: dict[str, Any]) -> Any:
    from ray.cluster_utils import Cluster

    cluster = Cluster(shutdown_at_exit=True)
    result["cluster"] = cluster
    node_ids = result["node_ids"] = {}
    for node in plan["nodes"]:
        started = cluster.add_node(**node["params"], env_vars=node["env"])
        node_ids[node["group"]] = started.node_id
        log(f"node {node['group']}: {started.node_id[:12]} {node['params']}")
    cluster.wait_for_nodes()
    # What the GCS says each node offers: the resources placement decides on.
    result["node_resources"] = {
        group: next(n["Resources"] for n in cluster.global_state.node_table()
                    if n["NodeID"] == node_id and n["Alive"])
        for group, node_id in node_ids.items()}
    return cluster


def deploy_and_wait(plan: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    dashboard = plan["dashboard_url"]
    auth = {"x-ray-authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    deadline = time.monotonic() + plan["timeout_s"]
    with httpx.Client(base_url=dashboard, timeout=60) as http:
        # The dashboard's HTTP server is up once the head node has started; its Serve module
        # may take a moment more.
        while True:
            try:
                if http.get("/api/ray/version", headers=auth).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the dashboard never answered /api/ray/version")
            time.sleep(0.5)
        # Without the token (or with a wrong one) the dashboard neither shows nor deploys.
        result["unauthenticated"] = [
            http.get(APPS).status_code,
            http.get(APPS, headers={"x-ray-authorization": "Bearer not-the-token"}).status_code,
            http.put(APPS, json=plan["serve_config"]).status_code]
        t0 = time.monotonic()
        put = http.put(APPS, json=plan["serve_config"], headers=auth)
        result["put"] = [put.status_code, put.text[:2000]]
        log(f"PUT {APPS}: {put.status_code} {put.text[:200]}")
        if put.status_code != 200:
            raise RuntimeError(f"PUT {APPS} answered {put.status_code}: {put.text[:2000]}")
        app = plan["app_name"]
        last = ""
        while True:
            r = http.get(APPS, params={"api_type": "declarative"}, headers=auth)
            details = r.json() if r.status_code == 200 else {}
            app_details = details.get("applications", {}).get(app, {})
            status = app_details.get("status", r.status_code)
            if status != last:
                log(f"app {app}: {status}")
                last = status
            if status == "RUNNING":
                break
            if status in FAILED_APP_STATES or time.monotonic() > deadline:
                raise RuntimeError(f"app {app} is {status} {time.monotonic() - t0:.0f} s "
                                   f"after the PUT:\n{_app_summary(app_details)}")
            time.sleep(1)
        result["deploy_s"] = round(time.monotonic() - t0, 1)
        result["serve_details"] = details
    return details


def _app_summary(app: dict[str, Any]) -> str:
    """The app's and each deployment's status and message (why replicas are not placed)."""
    lines = [f"{app.get('status')}: {app.get('message', '')[:3000]}"]
    for name, dep in app.get("deployments", {}).items():
        states = [r["state"] for r in dep.get("replicas", [])]
        lines.append(f"  {name}: {dep.get('status')} {states} {dep.get('message', '')[:1500]}")
    return "\n".join(lines)


def list_actor_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alive actor, with its node, from Ray's state API (through the dashboard)."""
    from ray.util.state import list_actors

    actors = list_actors(address=plan["dashboard_url"], detail=True, limit=10000,
                         filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [{"actor_id": a.actor_id, "class_name": a.class_name, "name": a.name,
             "node_id": a.node_id} for a in actors]


def send_requests(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan's REST requests, all at once (the workers batch them), to the HTTP proxy."""
    def send(req: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(plan["serve_url"] + req["path"], json=req["body"], timeout=180)
        json_body = r.headers.get("content-type", "").startswith("application/json")
        return {"status": r.status_code, "body": r.json() if json_body else r.text[:2000]}

    with ThreadPoolExecutor(len(plan["requests"])) as pool:
        answers = pool.map(send, plan["requests"].values())
        return dict(zip(plan["requests"], answers, strict=True))


def log_tails(max_chars: int = 24000) -> str:
    """The ends of the Serve and dashboard logs, to explain a failure."""
    logs = Path(os.environ["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs"
    files = sorted([*logs.glob("serve/controller_*.log"), *logs.glob("dashboard_ServeHead*"),
                    *logs.glob("serve/replica_*.log"), *logs.glob("worker-*.err")])
    out = []
    for f in files:
        lines = f.read_text(errors="replace").splitlines()
        if f.name.endswith(".err") and not any("Error" in ln for ln in lines):
            continue
        out.append(f"==> {f.relative_to(logs)} <==\n" + "\n".join(lines[-30:]))
    return "\n".join(out)[-max_chars:]


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    result: dict[str, Any] = {"ok": False}
    try:
        start_nodes(plan, result)
        deploy_and_wait(plan, result)
        result["actors"] = list_actor_nodes(plan)
        result["answers"] = send_requests(plan)
        result["ok"] = True
    except BaseException:  # reported to the test, which fails with it
        result["error"] = traceback.format_exc()
        try:
            result["logs"] = log_tails()
        except OSError as err:
            result["logs"] = f"(no logs: {err})"
    cluster = result.pop("cluster", None)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    if cluster is not None:
        t0 = time.monotonic()
        cluster.shutdown()
        log(f"cluster shut down in {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    main()
