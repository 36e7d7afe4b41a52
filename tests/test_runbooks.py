"""deploy/runbooks/ commands are real: `zayaserve` commands parse (benchmarks with their own
parsers), `helm`/`kubectl`/`serve`/`ray` flags are in the tool's --help (when the tool is here).
The e2e test runs scale.md's local rehearsal (scale 2 -> 3 -> 2, placement, `serve status`) on a
real Serve. Chart values, HTTP paths and ClusterConfig blocks: test_runbooks_references.py."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from runbooks_helpers import (
    COMMANDS,
    ROOT,
    RUNBOOKS,
    _blocks,  # noqa: F401 (test_docs.py uses it as rb._blocks)
    _commands,
    _prose,
    _segments,  # noqa: F401 (test_docs.py uses it as rb._segments)
)

from zayaserve.replicas.engine.engine_stats import EngineStats

TOOLS = ("helm", "kubectl", "serve", "ray")


def _ids(items: list[tuple[str, str, list[str]]]) -> list[str]:
    return [f"{name}:{' '.join(seg)[:60]}" for name, _, seg in items]


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
    # The remote tier's own counts (None without one: this cluster has no Redis).
    l2_only = {"zayaserve_" + f.name for f in fields(EngineStats) if f.default is None}
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
