"""Files stay small enough to read in one sitting: no hand-written Python file in the repository
passes 300 lines (code generated from .proto files is not hand-written). A file that grows past
it is split by what its parts do, not cut at line 300."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 300
SKIPPED_DIRS = {"build", "dist", "node_modules", "__pycache__"}


def _hand_written() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info")
               for p in parts[:-1]):
            continue
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        found.append(path)
    return found


def test_no_python_file_passes_300_lines() -> None:
    files = _hand_written()
    assert len(files) > 300, "the walk found too few files: has the layout changed?"
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split them by job): {long}"
