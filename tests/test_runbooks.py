"""deploy/runbooks/ says only real things: `zayaserve` commands parse (benchmarks with their own
parsers), `helm`/`kubectl`/`serve`/`ray` flags are in the tool's --help (when the tool is here),
chart values exist in values.yaml (ClusterConfig fields under `serve:` in values.schema.json),
HTTP paths are routes of the REST app, ClusterConfig YAML blocks validate. The e2e test runs
scale.md's local rehearsal (scale 2 -> 3 -> 2, placement, `serve status`) on a real Serve."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = sorted((ROOT / "deploy" / "runbooks").glob("*.md"))
CHART = ROOT / "helm" / "zayaserve"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"|", "||", "&&", ";", "&"}
SET_FLAGS = ("--set", "--set-string", "--set-json", "--set-file", "--set-literal")
TOOLS = ("helm", "kubectl", "serve", "ray")


def _blocks(lang: str, text: str | None = None) -> list[tuple[str, str]]:
    """(runbook name, body) of every ```lang block (of `text` alone when given)."""
    sources = [("", text)] if text is not None else [(p.name, p.read_text()) for p in RUNBOOKS]
    return [(name, m.group(2)) for name, t in sources for m in FENCE.finditer(t)
            if m.group(1) == lang]


def _segments(command: str) -> list[list[str]]:
    """The simple commands of a pipeline / list, without leading VAR=value assignments."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    groups = [list(g) for sep, g in itertools.groupby(lexer, lambda t: t in SEPARATORS)
              if not sep]
    return [g[next(i for i, t in enumerate(g + [""]) if not re.match(r"[A-Z_][A-Z0-9_]*=", t)):]
            for g in groups]


def _commands(text: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(runbook, line, argv) of every command in ```bash blocks; `\\` continues a line."""
    return [(name, line.strip(), seg) for name, body in _blocks("bash", text)
            for line in re.sub(r"\\\n\s*", " ", body).splitlines()
            if line.strip()[:1] not in ("", "#") for seg in _segments(line) if seg]


def _prose(path: Path) -> str:
    return FENCE.sub("", path.read_text())


def _ids(items: list[tuple[str, str, list[str]]]) -> list[str]:
    return [f"{name}:{' '.join(seg)[:60]}" for name, _, seg in items]


COMMANDS = _commands()
ZAYASERVE = [c for c in COMMANDS if c[2][0] == "zayaserve" or (
    c[2][0] in ("python", "python3") and c[2][1:2] == ["-m"] and c[2][2].startswith("zayaserve."))]
TOOL_COMMANDS = [c for c in COMMANDS if c[2][0] in TOOLS]


class _Parsed(Exception):
    pass


def _parse_with(main: Any, argv: list[str], what: str) -> None:
    """Runs a benchmark's `main` only as far as its argument parser."""
    real = argparse.ArgumentParser.parse_args

    def parse_only(self: Any, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(real(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only):
        try:
            main(argv)
        except _Parsed:
            return
        except SystemExit as err:
            pytest.fail(f"{what}: the benchmark's parser refused it (exit {err.code})")
    pytest.fail(f"{what}: main() never parsed its arguments")


@pytest.mark.parametrize("name,line,argv", ZAYASERVE, ids=_ids(ZAYASERVE))
def test_zayaserve_command_parses(name: str, line: str, argv: list[str]) -> None:
    from zayaserve.cluster.cli import build_parser

    assert len(RUNBOOKS) >= 8 and len(ZAYASERVE) >= 8 and len(COMMANDS) >= 60
    what = f"{name}: `{line}`"
    if argv[0] != "zayaserve":  # python -m zayaserve.bench.<x> ...
        return _parse_with(importlib.import_module(argv[2]).main, argv[3:], what)
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as err:
        pytest.fail(f"{what}: `zayaserve` refused it (exit {err.code})")
    if args.command == "bench":
        _parse_with(importlib.import_module(f"zayaserve.bench.{args.which}").main, args.rest,
                    what)


def _tool(name: str) -> str:
    """The real binary: Ray's console scripts from this venv, helm and kubectl as the chart
    tests fetch them (once, cached)."""
    if name in ("serve", "ray"):
        return str(Path(sys.executable).parent / name)
    from helm_tools import helm_binary, kubectl_binary

    return str(helm_binary() if name == "helm" else kubectl_binary())


@functools.cache
def _help(tool: str, *path: str) -> str:
    flag = [] if path == ("options",) else ["--help"]  # `kubectl options`: the global flags
    run = subprocess.run([tool, *path, *flag], capture_output=True, text=True, timeout=120)
    extra = _help(tool, "options") if tool.endswith("kubectl") and path != ("options",) else ""
    return run.stdout + run.stderr + extra


def _is_subcommand(help_text: str, word: str) -> bool:
    """`word` is listed in a "...Commands...:" section of the help (helm, kubectl, click)."""
    sections = re.findall(r"^[^\n]*Commands[^\n]*:\n(.*?)(?:\n\n|\Z)", help_text, re.M | re.S)
    return any(re.search(rf"^\s+{re.escape(word)}\b", s, re.M) for s in sections)


def _check_flags(argv: list[str], what: str) -> None:
    tool = _tool(argv[0])
    inner = argv.index("--") if "--" in argv else len(argv)
    words = [w for w in argv[1:3] if not w.startswith("-")]
    path = words[:2] if len(words) > 1 and _is_subcommand(_help(tool, words[0]), words[1]) \
        else words[:1]
    assert _is_subcommand(_help(tool), path[0]), f"{what}: `{path[0]}` is no subcommand"
    text = _help(tool, *path)
    for token in (t.split("=", 1)[0] for t in argv[1:inner] if re.match(r"-\w|--\w", t)):
        for flag in [token] if token.startswith("--") or len(token) == 2 else \
                [f"-{c}" for c in token[1:]]:  # -it: -i -t
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"{what}: `{argv[0]} {' '.join(path)}` has no flag {flag}"
    if inner < len(argv) - 1 and argv[inner + 1] in TOOLS:  # kubectl exec ... -- serve status
        _check_flags(argv[inner + 1:], what)


@pytest.mark.parametrize("name,line,argv", TOOL_COMMANDS, ids=_ids(TOOL_COMMANDS))
def test_tool_flags_exist(name: str, line: str, argv: list[str]) -> None:
    _check_flags(argv, f"{name}: `{line}`")


def _key_exists(keys: list[str]) -> bool:
    """In values.yaml (a free-form map such as annotations takes any key), else in the schema
    (ClusterConfig fields the chart passes through under `serve:`)."""
    node: Any = VALUES
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or (key not in node and node != {}):
            break
        if key not in node or i == len(keys) - 1:
            return True
        node = node[key]
    node = SCHEMA
    for key in keys:
        while "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if key in node.get("properties", {}):
            node = node["properties"][key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return False
    return True


def _chart_keys() -> list[tuple[str, str]]:
    """Keys set with `helm --set...` and `a.b.c` spans in prose that start with a chart key."""
    keys = [(name, p.split("=", 1)[0]) for name, _, seg in COMMANDS if seg[0] == "helm"
            for i, token in enumerate(seg) if token.partition("=")[0] in SET_FLAGS
            for p in re.split(r"(?<!\\),", token.partition("=")[2] or seg[i + 1])]
    for path in RUNBOOKS:
        for span in re.findall(r"`([^`\s]+)`", _prose(path)):
            key = span.split("=", 1)[0]
            if re.fullmatch(r"[A-Za-z][\w-]*(\.[\w-]+)+", key) and key.split(".")[0] in VALUES:
                keys.append((path.name, key))
    return keys


def test_chart_values_exist() -> None:
    keys = _chart_keys()
    assert len(keys) >= 40
    missing = [f"{name}: {key}" for name, key in keys if not _key_exists(
        [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", key)])]
    assert not missing, f"chart values that do not exist: {missing}"


def test_http_paths_are_routes() -> None:
    from zayaserve.cluster.frontend.openai_api import build_openai_app

    app = build_openai_app(SimpleNamespace(model_name="tiny", max_model_len=64))
    routes = [re.sub(r"\{[^}]+\}", "[^/]+", r.path) for r in app.routes]  # type: ignore[attr-defined]
    pattern = (r"http://127\.0\.0\.1:8000(/[^\s'\"`|)]*)|(?<![\w/.:-])(/v1/[\w{}$/.-]*|"
               r"/(?:health|metrics|tokenize|detokenize|version)\b)")
    mentioned = [(p.name, (url or bare).rstrip(".")) for p in RUNBOOKS
                 for url, bare in re.findall(pattern, p.read_text())]
    assert len(mentioned) >= 20
    bad = [f"{name}: {p}" for name, p in mentioned if not (
        any(r.startswith(p) for r in routes) if p.endswith("/") else any(
            re.fullmatch(r, re.sub(r"\$\{?\w+\}?|<[^>]+>|\{[^}]+\}", "X", p)) for r in routes))]
    assert not bad, f"paths the REST app does not serve: {bad}"


def test_cluster_config_blocks_validate() -> None:
    from zayaserve.cluster.config import ClusterConfig

    configs = [body for _, body in _blocks("yaml") if body.startswith("# ClusterConfig")]
    assert configs
    for body in configs:
        ClusterConfig.create(**yaml.safe_load(body))


def _metric_names() -> set[str]:
    names = {m for path in RUNBOOKS
             for m in re.findall(r"`[^`]*?(zayaserve_[a-z0-9_]+)", _prose(path))}
    return names - {"zayaserve_attention", "zayaserve_experts"}  # the groups' Ray resources


# ---- e2e: scale.md's local rehearsal on a real Ray Serve ---------------------------------

@pytest.fixture(scope="module")
def local_cluster(ray_session: None) -> Any:
    from cluster_harness import deploy, undeploy

    cluster = deploy(expert_shards=2)
    yield cluster
    undeploy()


def _serve_status() -> dict[str, Any]:
    """`serve status` asks the dashboard; the test session's Ray has none (conftest.py), and
    then Ray Serve's Python API answers the same question."""
    import ray
    from ray import serve

    dashboard = (getattr(ray._private.worker.global_worker.node, "address_info", None)
                 or {}).get("webui_url")
    if dashboard:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
               "RAY_DASHBOARD_ADDRESS": f"http://{dashboard}", "RAY_AUTH_MODE": "token"}
        run = subprocess.run([str(Path(sys.executable).parent / "serve"), "status"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return yaml.safe_load(run.stdout)["applications"]["zayaserve"]  # type: ignore[no-any-return]
    app = serve.status().applications["zayaserve"]
    return {"status": str(app.status),
            "deployments": {n: {"status": str(d.status)} for n, d in app.deployments.items()}}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_scale_rehearsal_on_a_local_cluster(local_cluster: Any) -> None:
    import httpx
    from cluster_harness import wait_for

    from zayaserve.cluster.cli import build_parser
    from zayaserve.cluster.cli import main as cli_main

    section = (ROOT / "deploy" / "runbooks" / "scale.md").read_text().split("## Rehearse", 1)[1]
    base, (serve_argv, *steps) = local_cluster.base, [c[2] for c in _commands(section)]
    assert [s[0] for s in steps] == ["zayaserve", "curl", "python3", "serve", "zayaserve"]
    # The first terminal's `zayaserve serve` is what the harness deployed here.
    started = build_parser().parse_args(serve_argv[1:])
    assert (started.command, started.model, started.expert_shards) == ("serve", "tiny", 2)
    want = 2
    for argv in (s for s in steps if s[0] != "python3"):
        argv = [a.replace("http://127.0.0.1:8000", base) for a in argv]
        if argv[:2] == ["zayaserve", "scale"]:
            want = int(argv[argv.index("--expert-shards") + 1])
            assert cli_main(argv[1:]) == 0, argv
        elif argv[0] == "curl":
            view = httpx.get(argv[-1], timeout=30).json()
            serving = [s for s in view["shards"] if s["state"] == "serving"]
            assert len(serving) == want == view["desired_shards"], view
            assert sorted(e for s in serving for e in s["experts"]) == list(
                range(view["num_experts"]))
        else:  # serve status
            def healthy() -> bool:
                app = _serve_status()
                return str(app["status"]).endswith("RUNNING") and all(
                    str(d["status"]).endswith("HEALTHY") for d in app["deployments"].values())
            wait_for(healthy, 120, "the app RUNNING, every deployment HEALTHY")
    assert want == 2
    # The metric names the runbooks' prose cites are on /metrics (after one request, so the
    # per-expert counters have samples); the L2-only ones come from the engine's stats.
    r = httpx.post(base + "/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    engine = (ROOT / "replicas" / "engine" / "engine_stats.py").read_text()
    l2_only = {"zayaserve_" + k for k in re.findall(r'stats\["(\w+)"\]', engine)}
    unknown: set[str] = set()

    def all_named_metrics_live() -> bool:  # the shards' counts arrive with their heartbeats
        text = httpx.get(base + "/metrics", timeout=30).text
        live = set(re.findall(r"^(?:# TYPE )?(zayaserve_[a-z0-9_]+)", text, re.M)) | l2_only
        unknown.clear()
        unknown.update(m for m in _metric_names() if m not in live and m + "_total" not in live
                       and m.removesuffix("_total") not in live)
        return not unknown

    with contextlib.suppress(AssertionError):
        wait_for(all_named_metrics_live, 30, "the metrics")
    assert not unknown, f"metrics the runbooks name that /metrics lacks: {sorted(unknown)}"
