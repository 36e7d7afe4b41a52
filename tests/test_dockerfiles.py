"""The images in deploy/Dockerfile.{cuda,rocm,cpu}: pinned bases whose Ray is the chart's
rayVersion, COPY sources that exist and are exactly what pyproject's package map needs (a wheel
built from only those files holds the app and its protos), a pip install of the project, no
secrets, a non-root `ray` user, and tag suffixes that match what the chart picks per
gpu.vendor. No container engine is needed: the Dockerfiles are parsed, and the imports the
images check at build time are run in this venv."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "zayaserve"
SUFFIXES = ("cuda", "rocm", "cpu")
IMPORTS = "import zayaserve.cluster.app, ray.serve, torch"


def _instructions(suffix: str) -> list[tuple[str, str]]:
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


def _args(suffix: str) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions(suffix) if i == "ARG" and "=" in a)


def _copies(suffix: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags dropped."""
    out = []
    for instr, args in _instructions(suffix):
        if instr == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def _chart_suffixes() -> dict[str, str]:
    """gpu.vendor -> image tag suffix, from the chart's zayaserve.image helper."""
    tpl = (CHART / "templates" / "_helpers.tpl").read_text()
    m = re.search(r'\$suffix := get \(dict ((?:"[\w-]+" ?)+)\) \.Values\.gpu\.vendor', tpl)
    assert m, "the chart's image helper changed: update this test"
    words = re.findall(r'"([\w-]+)"', m.group(1))
    return dict(zip(words[::2], words[1::2], strict=True))


def _ray_version() -> str:
    m = re.search(r'rayVersion: "([\d.]+)"', (CHART / "templates" / "rayservice.yaml").read_text())
    assert m
    return m.group(1)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_base_image_is_pinned_and_runs_the_charts_ray(suffix: str) -> None:
    froms = [a for i, a in _instructions(suffix) if i == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert "$" not in image and ":" in image, f"unpinned base {image}"
    repo, tag = image.rsplit(":", 1)
    assert tag != "latest" and "latest" not in tag and "nightly" not in tag, image
    ray = _ray_version()
    if suffix == "rocm":  # AMD's image carries an older Ray: upgraded to the chart's
        assert repo == "rocm/ray" and re.fullmatch(r"ray-[\d.]+_rocm[\d.]+_ubuntu[\d.]+_py3\.1[1-9]"
                                                   r"_pytorch[\d.]+", tag), tag
        assert _args(suffix)["RAY_VERSION"] == ray
        assert any(i == "RUN" and '"ray[serve]==${RAY_VERSION}"' in a
                   for i, a in _instructions(suffix))
    else:
        assert repo == "rayproject/ray" and tag.startswith(f"{ray}-py31"), tag
        assert tag.endswith("-cu128") if suffix == "cuda" else tag == f"{ray}-py311"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_copy_sources_exist_and_cover_the_package(suffix: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"zayaserve": "."}
    copied = {s.rstrip("/") for sources, _ in _copies(suffix) for s in sources}
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile.{suffix}: COPY {source}: no such path"
    folders = {p.split(".")[1] for p in pyproject["tool"]["setuptools"]["packages"] if "." in p}
    modules = {p.name for p in ROOT.glob("*.py")}
    missing = (folders | modules | {"pyproject.toml", pyproject["project"]["readme"]}) - copied
    assert not missing, f"Dockerfile.{suffix} does not copy {sorted(missing)}"
    assert not copied & {"tests", ".venv", ".git", "helm", "deploy", "."}, copied


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_pip_installs_the_project_and_checks_its_imports(suffix: str) -> None:
    dest = {d.rstrip("/") for sources, d in _copies(suffix) if "pyproject.toml" in sources}
    assert len(dest) == 1
    runs = [a for i, a in _instructions(suffix) if i == "RUN"]
    install = [r for r in runs if re.search(rf"pip install --no-cache-dir {re.escape(*dest)}\b",
                                            r)]
    assert install, f"Dockerfile.{suffix}: no `pip install --no-cache-dir {dest}`"
    assert IMPORTS in install[0], "the image should import what the Serve app needs"
    torch_first = [r for r in runs[:runs.index(install[0])] if "torch==${TORCH_VERSION}" in r]
    assert torch_first and "--index-url ${TORCH_INDEX_URL}" in torch_first[0]
    assert "download.pytorch.org/whl/" in _args(suffix)["TORCH_INDEX_URL"]
    if suffix == "rocm":
        assert "/whl/rocm" in _args(suffix)["TORCH_INDEX_URL"]


def test_the_imports_the_images_rely_on_work_here() -> None:
    run = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_runs_as_ray_without_secrets(suffix: str) -> None:
    instr = _instructions(suffix)
    users = [a for i, a in instr if i == "USER"]
    assert users and users[-1] == "ray", users
    assert any(i == "WORKDIR" and a == "/home/ray" for i, a in instr)
    for i, a in instr:
        if i in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(secret|token|password|api_key)\w*=", a), a
    text = (ROOT / "deploy" / f"Dockerfile.{suffix}").read_text()
    assert "ZAYASERVE_API_KEY" not in text and "KV_CACHE_SECRET" not in text


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tag_suffix_matches_the_chart(suffix: str) -> None:
    assert set(_chart_suffixes().values()) == set(SUFFIXES)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert values["image"]["tag"] == ""  # the suffix logic applies by default
    labels = " ".join(a for i, a in _instructions(suffix) if i == "LABEL")
    assert f'ai.zayaserve.tag-suffix="{suffix}"' in labels
    assert f'org.opencontainers.image.version="{app_version}"' in labels
    text = (ROOT / "deploy" / f"Dockerfile.{suffix}").read_text()
    assert f"Chart tag suffix: {suffix}" in text
    vendor = next(v for v, s in _chart_suffixes().items() if s == suffix)
    assert f"gpu.vendor is {vendor}" in text
    tag = f"{values['image']['repository']}:{app_version}-{suffix}"
    assert f"-f deploy/Dockerfile.{suffix} -t {tag} ." in text, tag


def test_a_wheel_from_the_copied_files_holds_the_app(tmp_path: Path) -> None:
    """What `pip install /tmp/zayaserve-src` builds in the image, from only the COPY'd files."""
    copies = {repr(_copies(s)) for s in SUFFIXES}
    assert len(copies) == 1, "the three images should copy the same files"
    src = tmp_path / "zayaserve-src"
    for sources, dest in _copies("cpu"):
        target = src / Path(dest).relative_to("/tmp/zayaserve-src")
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path / "out"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("zayaserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("zayaserve/__init__.py", "zayaserve/client.py", "zayaserve/cluster/app.py",
                 "zayaserve/cluster/cli.py", "zayaserve/replicas/expert_shard.py",
                 "zayaserve/router/protos/expert.proto", "zayaserve/kernels/registry.py",
                 "zayaserve/bench/serve.py"):
        assert want in names, f"{want} missing from the image's wheel"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "zayaserve.cluster.cli:main" in zipfile.ZipFile(wheel).read(
        entry[0]).decode()
