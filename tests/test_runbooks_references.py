"""deploy/runbooks/ names only real things: chart values exist in values.yaml (ClusterConfig
fields under `serve:` in values.schema.json), HTTP paths are routes of the REST app, ClusterConfig
YAML blocks validate."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from typing import Any

import yaml
from runbooks_helpers import COMMANDS, ROOT, RUNBOOKS, _blocks, _prose

CHART = ROOT / "helm" / "zayaserve"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
SET_FLAGS = ("--set", "--set-string", "--set-json", "--set-file", "--set-literal")


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
