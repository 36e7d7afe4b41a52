"""What the runbook tests share (and test_docs.py, through test_runbooks): the runbooks, their
fenced blocks, prose, and the simple commands of their ```bash blocks."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = sorted((ROOT / "deploy" / "runbooks").glob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SEPARATORS = {"|", "||", "&&", ";", "&"}


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


COMMANDS = _commands()
