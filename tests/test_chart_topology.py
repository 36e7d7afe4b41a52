"""The Helm chart's Ray topology, on one machine: `helm template` with ci/cpu-only-values.yaml,
then one Ray node per group (head, attention, experts) started with exactly the rendered
`rayStartParams` (as KubeRay turns them into `ray start` flags), the pod's environment and
KubeRay's token authentication; the rendered `serveConfigV2` deployed as KubeRay deploys it
(PUT /api/serve/applications/ on the head's dashboard). Checked: the nodes offer what the chart
says, the dashboard refuses calls without the token, every Serve deployment's replicas run on
the node whose group advertises the custom resources its ray_actor_options ask for, and REST
completions equal the offline engine's on the same checkpoint, token for token.

The cluster lives in tests/chart_topology_driver.py, a subprocess in a session of its own
(this pytest process may hold a Ray of its own, and Ray allows one per process); the test
kills that session's processes whatever happens, and never runs `ray stop`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from chart_topology_driver import RESULT_PREFIX, make_plan
from cluster_harness import MAX_TOKENS, PROMPTS
from helm_tools import rayservice, rendered

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

DRIVER = Path(__file__).resolve().parent / "chart_topology_driver.py"
DEPLOY_TIMEOUT_S = 420


def rest_requests(model: str) -> dict[str, dict[str, Any]]:
    """Greedy completions and chats of every prompt, with per-token logprobs: the legacy
    layout names each token by its text, the chat one by its bytes (exact even for a token
    holding part of a UTF-8 character, whose text is U+FFFD)."""
    common = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    requests = {}
    for p in PROMPTS:
        requests[f"completion:{p}"] = {"path": "/v1/completions",
                                       "body": {**common, "prompt": p, "logprobs": 1}}
        requests[f"chat:{p}"] = {"path": "/v1/chat/completions", "body": {
            **common, "messages": [{"role": "user", "content": p}], "logprobs": True}}
    return requests


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def run_driver(plan: dict[str, Any], work: Path, auth: dict[str, str]) -> dict[str, Any]:
    """The driver in a session of its own; every process left in it is killed at the end."""
    ray_tmp = tempfile.mkdtemp(prefix="zsct")  # short: Ray's Unix socket paths live here
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan))
    # No RAY_* of this session's own Ray (ray.init puts RAY_AUTH_MODE, RAY_ADDRESS here).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(auth, RAY_TMPDIR=ray_tmp,
               # The pods' image has its own home; here a fresh one, so the built-in
               # checkpoint is written by the cluster itself and the user's cache is not used.
               ZAYASERVE_HOME=str(work / "home"))
    log = work / "driver.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(plan_file)], env=env,
                                stdout=subprocess.PIPE, stderr=out, cwd=work,
                                start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=DEPLOY_TIMEOUT_S + 240)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
    finally:
        # Ray's workers have process groups of their own, but stay in the driver's session.
        for _ in range(3):
            for pid in _session_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        left = _session_pids(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in stdout.decode(errors="replace").splitlines()
             if ln.startswith(RESULT_PREFIX)]
    stderr = log.read_text(errors="replace")
    assert lines, f"the driver printed no result (exit {proc.returncode}):\n{stderr[-8000:]}"
    result = json.loads(lines[-1].removeprefix(RESULT_PREFIX))
    assert result["ok"], (f"{result['error']}\n--- Ray logs ---\n{result.get('logs')}\n"
                          f"--- driver ---\n{stderr[-4000:]}")
    assert not left, f"processes of the driver's session survived SIGKILL: {left}"
    return result


def offline_outputs(checkpoint: Path) -> dict[str, tuple[str, list[Any]]]:
    """The offline engine's answers to rest_requests: text, and each token's text (legacy
    completions) or bytes (chat)."""
    from zayaserve import LLM, SamplingParams
    from zayaserve.cluster.frontend.logprob_format import token_bytes, token_text

    llm = LLM(model=str(checkpoint))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tok = llm.get_tokenizer()
    plain = llm.generate(PROMPTS, params)
    chats = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    want = {}
    for p, o, c in zip(PROMPTS, plain, chats, strict=True):
        want[f"completion:{p}"] = (o.outputs[0].text,
                                   [token_text(tok, t) for t in o.outputs[0].token_ids])
        want[f"chat:{p}"] = (c.outputs[0].text,
                             [token_bytes(tok, t) for t in c.outputs[0].token_ids])
    return want


def check_nodes(plan: dict[str, Any], result: dict[str, Any]) -> dict[str, str]:
    """Each node offers what its group's rayStartParams say, custom resources exactly;
    returns which group advertises each custom resource."""
    advertised: dict[str, str] = {}
    for node in plan["nodes"]:
        group, params = node["group"], node["params"]
        offered = result["node_resources"][group]
        custom = {k: v for k, v in offered.items()
                  if k not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not k.startswith("node:")}
        assert custom == params["resources"], (group, offered)
        assert offered.get("CPU", 0) == params["num_cpus"], (group, offered)
        assert offered.get("GPU", 0) == params["num_gpus"], (group, offered)
        for name in custom:
            assert name not in advertised, f"{name}: offered by {advertised[name]} and {group}"
            advertised[name] = group
    head = next(n["params"] for n in plan["nodes"] if n["group"] == "head")
    assert head["num_cpus"] == 0, "the head offers CPUs: replicas could land there"
    return advertised


def check_placement(plan: dict[str, Any], result: dict[str, Any],
                    advertised: dict[str, str]) -> dict[str, tuple[str, int]]:
    """Every deployment asks for custom resources of exactly one group (the ones the rendered
    args name); its replicas run on that group's node, per Serve and per Ray's actor table."""
    node_of = result["node_ids"]
    details = result["serve_details"]
    app = details["applications"][plan["app_name"]]
    assert app["status"] == "RUNNING", app
    args = plan["serve_config"]["applications"][0]["args"]
    rendered_asks = [v for k, v in args.items() if k.endswith("_ray_resources") and v]
    actors = {a["actor_id"]: a for a in result["actors"]}
    seen_asks = []
    placed = {}
    for name, dep in app["deployments"].items():
        asks = (dep["deployment_config"].get("ray_actor_options") or {}).get("resources")
        assert asks, f"{name}: asks for no custom resource, so any node with CPU may take it"
        assert asks in rendered_asks, f"{name}: {asks} is none of the rendered {rendered_asks}"
        seen_asks.append(asks)
        (group,) = {advertised.get(r, f"<no group offers {r}>") for r in asks}
        assert group in node_of, f"{name}: {asks}: {group}"
        running = [r for r in dep["replicas"] if r["state"] == "RUNNING"]
        assert running and len(running) == len(dep["replicas"]), (name, dep["replicas"])
        for replica in running:
            assert replica["node_id"] == node_of[group], (name, group, replica)
            assert actors[replica["actor_id"]]["node_id"] == node_of[group], (name, replica)
        placed[name] = (group, len(running))
    assert all(a in seen_asks for a in rendered_asks), (rendered_asks, seen_asks)
    assert placed["AttentionWorker"][1] == args["attention_workers"], placed
    assert placed["ExpertShard"][1] == args["expert_shards"], placed
    # Serve's controller stays on the head; proxies run where proxy_location says (the head
    # always has one: the chart's Service sends traffic to the head's serve port).
    assert details["controller_info"]["node_id"] == node_of["head"], details["controller_info"]
    where = plan["serve_config"].get("proxy_location", "EveryNode")
    want = {"EveryNode": {node_of[g] for g, _ in placed.values()} | {node_of["head"]},
            "HeadOnly": {node_of["head"]}, "Disabled": set()}[where]
    proxies = {nid for nid, p in details["proxies"].items() if p["status"] == "HEALTHY"}
    assert proxies == want, (where, proxies, want)
    return placed


def check_answers(result: dict[str, Any], want: dict[str, tuple[str, list[Any]]]) -> None:
    assert set(result["answers"]) == set(want), sorted(result["answers"])
    for key, answer in result["answers"].items():
        assert answer["status"] == 200, (key, answer)
        (choice,) = answer["body"]["choices"]
        text, tokens = want[key]
        assert len(tokens) == MAX_TOKENS, (key, tokens)
        if key.startswith("chat:"):
            got_text = choice["message"]["content"]
            got_tokens = [t["bytes"] for t in choice["logprobs"]["content"]]
        else:
            got_text, got_tokens = choice["text"], choice["logprobs"]["tokens"]
        assert got_tokens == tokens, (key, got_tokens, tokens)
        assert got_text == text, (key, got_text, text)
        assert answer["body"]["usage"]["completion_tokens"] == MAX_TOKENS, answer["body"]


def test_chart_topology_on_one_machine(tmp_path: Path) -> None:
    import ray

    t0 = time.monotonic()
    docs = rendered("cpu-only")
    cluster_spec = rayservice(docs)["spec"]["rayClusterConfig"]
    assert cluster_spec["rayVersion"] == ray.__version__, "the chart's Ray is not this Ray"
    # KubeRay's authOptions mode token: RAY_AUTH_MODE=token and a generated RAY_AUTH_TOKEN
    # in every Ray container (and its dashboard client sends the token).
    assert cluster_spec.get("authOptions", {}).get("mode") == "token", cluster_spec
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    plan = make_plan(docs, DEPLOY_TIMEOUT_S)
    plan["requests"] = rest_requests(plan["model"])
    result = run_driver(plan, tmp_path, auth)
    print(f"\n[chart topology] app RUNNING {result['deploy_s']} s after the PUT; driver done "
          f"{time.monotonic() - t0:.0f} s after the start")

    # Token authentication is on: GET and PUT without the token 401, with a wrong one 403
    # (and the right one deployed).
    assert result["unauthenticated"] == [401, 403, 401], result["unauthenticated"]
    assert result["put"][0] == 200, result["put"]
    advertised = check_nodes(plan, result)
    placed = check_placement(plan, result, advertised)
    print(f"[chart topology] placement (group, replicas): {placed}")

    # REST answers equal the offline engine's on the checkpoint the cluster wrote.
    model = plan["serve_config"]["applications"][0]["args"]["model"]
    checkpoint = tmp_path / "home" / "checkpoints" / Path(model).name
    assert (checkpoint / "config.json").is_file(), f"no checkpoint written at {checkpoint}"
    check_answers(result, offline_outputs(checkpoint))
    print(f"[chart topology] {len(result['answers'])} REST answers equal the offline engine's; "
          f"{time.monotonic() - t0:.0f} s in all")
