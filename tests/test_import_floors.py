"""The floor plan: every module sits on a floor and imports only from its own floor or below.

    kernels, tracing  <-  model  <-  engine  <-  token dispatch  <-  deployments
        <-  front end and control plane  <-  command line  <-  bench, devtools

Every `import` counts, at module level or inside a function, under TYPE_CHECKING or not: each
is a dependency a reader has to follow. docs/structure.md draws the same plan."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (path prefix, floor, name): the longest matching prefix places a file.
FLOORS = [
    ("kernels/", 0, "kernels"),
    ("replicas/observability/", 0, "tracing"),
    ("replicas/validation_errors.py", 0, "kernels"),
    ("replicas/model/", 1, "model"),
    ("replicas/engine/", 2, "engine"),
    ("replicas/kv_tiers/", 2, "engine"),
    ("replicas/rsa/", 2, "engine"),
    ("replicas/llm.py", 2, "engine"),
    ("__init__.py", 2, "engine"),
    ("replicas/__init__.py", 2, "engine"),
    ("router/", 3, "token dispatch"),
    ("replicas/attention_worker.py", 4, "deployments"),
    ("replicas/cluster_messages.py", 4, "deployments"),
    ("replicas/expert_shard.py", 4, "deployments"),
    ("replicas/routing_stats.py", 4, "deployments"),
    ("replicas/serve_request_router.py", 4, "deployments"),
    ("cluster/", 5, "front end and control plane"),
    ("client.py", 5, "front end and control plane"),
    ("cluster/cli.py", 6, "command line"),
    ("cluster/serve_cli.py", 6, "command line"),
    ("cluster/scale_cli.py", 6, "command line"),
    ("bench/", 7, "bench and devtools"),
    ("replicas/devtools/", 7, "bench and devtools"),
]


def _floor(rel: str) -> tuple[int, str]:
    best = max((p for p in FLOORS if rel == p[0] or (p[0].endswith("/") and rel.startswith(p[0]))),
               key=lambda p: len(p[0]), default=None)
    assert best is not None, f"{rel} is on no floor: add it to FLOORS (and docs/structure.md)"
    return best[1], best[2]


def _target(module: str) -> str | None:
    """The file (relative to the root) a `zayaserve.` module name points at."""
    if module != "zayaserve" and not module.startswith("zayaserve."):
        return None
    parts = module.split(".")[1:]
    for candidate in ("/".join(parts) + ".py", "/".join(parts + ["__init__.py"])):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def _sources() -> list[Path]:
    skip = {"tests", "docs", "helm", "deploy", ".venv", "build"}
    return [p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in skip
            and "protos" not in p.parts and ".egg-info" not in str(p) and p.name != "setup.py"]


def arrows() -> list[str]:
    """Every import that points up the floor plan."""
    bad = set()
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        floor, name = _floor(rel)
        for line, module in _imports(path):
            target = _target(module)
            if target is None or target == rel:
                continue
            up, up_name = _floor(target)
            if up > floor:
                bad.add(f"{rel}:{line} ({name}) imports {target} ({up_name})")
    return sorted(bad)


def test_every_file_is_on_a_floor() -> None:
    files = [p.relative_to(ROOT).as_posix() for p in _sources()]
    assert len(files) > 150
    for rel in files:
        _floor(rel)


def test_no_import_points_up() -> None:
    bad = arrows()
    assert not bad, "imports against the floor plan:\n" + "\n".join(bad)
