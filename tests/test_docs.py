"""README.md and docs/ say only real things, as the runbooks must (`test_runbooks.py`, whose
checks this reuses): every `zayaserve` and `python -m zayaserve...` command in a ```bash block
parses, `helm`/`kubectl`/`serve`/`ray` flags are in the tool's --help, HTTP paths are routes of
the REST app, ClusterConfig YAML blocks validate, every relative link resolves, and README stays
a short tour (the manual is in docs/)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_runbooks as rb
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


INLINE = re.compile(r"`((?:zayaserve|python -m zayaserve\.\w+(?:\.\w+)*) [^`]*--[^`]*)`")


def _commands() -> list[tuple[str, str, list[str]]]:
    """Commands of ```bash blocks, and whole commands (with a flag, no placeholder) quoted
    inline in the prose."""
    found = [(p.name, line, argv) for p in PAGES
             for _, line, argv in rb._commands(p.read_text())]
    for p in PAGES:
        for span in INLINE.findall(rb._prose(p).replace("\n", " ")):
            if not re.search(r"[\[\]<>|]|\.\.\.", span):
                found.extend((p.name, span, argv) for argv in rb._segments(span) if argv)
    return found


COMMANDS = _commands()
ZAYASERVE = [c for c in COMMANDS if c[2][0] == "zayaserve" or (
    c[2][0] in ("python", "python3") and c[2][1:2] == ["-m"] and c[2][2].startswith("zayaserve."))]
TOOL_COMMANDS = [c for c in COMMANDS if c[2][0] in rb.TOOLS]


def test_readme_is_a_short_tour_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    blocks = [body.strip() for _, body in rb._blocks("bash", readme)]
    assert blocks[:2] == ["bash deploy/demo.sh", "bash tests/run.sh"]
    assert "../shared" not in readme and not any("../shared" in p.read_text() for p in PAGES)


def test_there_are_commands_to_check() -> None:
    assert len(PAGES) >= 10 and len(ZAYASERVE) >= 4 and len(TOOL_COMMANDS) >= 2


@pytest.mark.parametrize("name,line,argv", ZAYASERVE, ids=rb._ids(ZAYASERVE))
def test_zayaserve_command_parses(name: str, line: str, argv: list[str]) -> None:
    rb.test_zayaserve_command_parses(name, line, argv)


@pytest.mark.parametrize("name,line,argv", TOOL_COMMANDS, ids=rb._ids(TOOL_COMMANDS))
def test_tool_flags_exist(name: str, line: str, argv: list[str]) -> None:
    rb._check_flags(argv, f"{name}: `{line}`")


def test_links_resolve() -> None:
    bad = []
    for page in PAGES:
        for target in LINK.findall(rb._prose(page)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                bad.append(f"{page.name}: {target}")
    assert not bad, f"links to nothing: {bad}"


def test_http_paths_are_routes() -> None:
    from zayaserve.cluster.frontend.openai_api import build_openai_app

    app = build_openai_app(SimpleNamespace(model_name="tiny", max_model_len=64))
    routes = [re.sub(r"\{[^}]+\}", "[^/]+", r.path) for r in app.routes]  # type: ignore[attr-defined]
    pattern = r"(?<![\w/.:-])(/v1/[\w{}/.-]*|/(?:health|metrics|tokenize|detokenize|version)\b)"
    mentioned = [(p.name, path.rstrip(".")) for p in PAGES
                 for path in re.findall(pattern, p.read_text())]
    assert len(mentioned) >= 10
    bad = [f"{name}: {p}" for name, p in mentioned if not any(
        re.fullmatch(r, re.sub(r"\{[^}]+\}", "X", p)) or r.startswith(p) for r in routes)]
    assert not bad, f"paths the REST app does not serve: {bad}"


def test_cluster_config_blocks_validate() -> None:
    from zayaserve.cluster.config import ClusterConfig

    blocks = [body for p in PAGES for _, body in rb._blocks("yaml", p.read_text())]
    assert blocks
    for body in blocks:
        ClusterConfig.create(**yaml.safe_load(body))
