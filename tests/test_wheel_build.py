"""The sdist and the wheel hold what the checkout holds, found by discovery: the wheel built
from the sdist (as `pip install zayaserve-*.tar.gz` and `python -m build` build it) equals the
wheel built from the tree, file for file, and both have every module and data file of the
package folders. Built with setuptools' PEP 517 hooks in this venv (no download)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from dockerfile_parse import ROOT, package_folders

pytestmark = pytest.mark.timeout(600)

BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1], sys.argv[2]
print(getattr(build_meta, "build_" + kind)(out))
"""


def _build(kind: str, source: Path, out: Path) -> Path:
    run = subprocess.run([sys.executable, "-c", BUILD, kind, str(out)], cwd=source,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return out / run.stdout.strip().splitlines()[-1]


def _package_files(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("zayaserve/")}


def _tree_copy(where: Path) -> Path:
    """The checkout without what building leaves in it (setuptools' build/ folder would carry
    old modules into a wheel) or what is not the project's."""
    copy = where / "tree"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    return copy


def test_the_wheel_from_the_sdist_is_the_wheel_from_the_tree(tmp_path: Path) -> None:
    tree = _tree_copy(tmp_path)
    sdist = _build("sdist", tree, tmp_path / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    from_sdist = _build("wheel", unpacked, tmp_path / "from-sdist")
    from_tree = _build("wheel", tree, tmp_path / "from-tree")
    sdist_wheel = _package_files(set(zipfile.ZipFile(from_sdist).namelist()))
    tree_wheel = _package_files(set(zipfile.ZipFile(from_tree).namelist()))
    assert sdist_wheel == tree_wheel, (sorted(tree_wheel - sdist_wheel)[:20],
                                       sorted(sdist_wheel - tree_wheel)[:20])

    want = {f"zayaserve/{p.relative_to(ROOT)}" for folder in package_folders()
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".md")}
    want |= {f"zayaserve/{p.name}" for p in ROOT.glob("*.py") if p.name != "setup.py"}
    assert {"zayaserve/router/protos/expert.proto", "zayaserve/cluster/protos/generation_pb2.pyi",
            "zayaserve/replicas/observability/tracing.py"} <= want
    missing = sorted(want - tree_wheel)
    assert not missing, f"the wheel lacks {len(missing)} file(s): {missing[:20]}"
    extra = sorted(n for n in tree_wheel - want if not n.startswith("zayaserve-"))
    assert not extra, f"the wheel carries files that are not the package's: {extra[:20]}"
