"""Reading deploy/Dockerfile.{cuda,rocm,cpu} without a container engine: instructions with
their continuations joined, ARG defaults, COPY sources and destinations."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = ("cuda", "rocm", "cpu")


def instructions(suffix: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile.<suffix>, continuations joined."""
    text = (ROOT / "deploy" / f"Dockerfile.{suffix}").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args(suffix: str) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions(suffix) if i == "ARG" and "=" in a)


def copies(suffix: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags dropped."""
    out = []
    for instr, rest in instructions(suffix):
        if instr == "COPY":
            words = [w for w in rest.split() if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def package_folders() -> set[str]:
    """The repository's top-level folders that are packages of `zayaserve` (setup.py finds
    them the same way: a folder with an __init__.py, tests excluded)."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
