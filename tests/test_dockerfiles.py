"""The images in deploy/Dockerfile.{cuda,rocm,cpu}: pinned bases whose Ray is the chart's
rayVersion, COPY sources that exist and are exactly what the package needs (setup.py finds its
packages by discovery), a pip install of the project, no secrets, a non-root `ray` user, and tag
suffixes that match what the chart picks per gpu.vendor. No container engine is needed: the
Dockerfiles are parsed here; tests/test_image_install.py runs each image's install step."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from dockerfile_parse import ROOT, SUFFIXES, args, copies, instructions, package_folders

CHART = ROOT / "helm" / "zayaserve"
IMPORTS = "import zayaserve.cluster.app, ray.serve, torch"


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
    froms = [a for i, a in instructions(suffix) if i == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert "$" not in image and ":" in image, f"unpinned base {image}"
    repo, tag = image.rsplit(":", 1)
    assert tag != "latest" and "latest" not in tag and "nightly" not in tag, image
    ray = _ray_version()
    if suffix == "rocm":  # AMD's image carries an older Ray: upgraded to the chart's
        assert repo == "rocm/ray" and re.fullmatch(r"ray-[\d.]+_rocm[\d.]+_ubuntu[\d.]+_py3\.1[1-9]"
                                                   r"_pytorch[\d.]+", tag), tag
        assert args(suffix)["RAY_VERSION"] == ray
        assert any(i == "RUN" and '"ray[serve]==${RAY_VERSION}"' in a
                   for i, a in instructions(suffix))
    else:
        assert repo == "rayproject/ray" and tag.startswith(f"{ray}-py31"), tag
        assert tag.endswith("-cu128") if suffix == "cuda" else tag == f"{ray}-py311"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_copy_sources_exist_and_cover_the_package(suffix: str) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"] == {"zayaserve": "."}
    copied = {s.rstrip("/") for sources, _ in copies(suffix) for s in sources}
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile.{suffix}: COPY {source}: no such path"
    folders = package_folders()
    modules = {p.name for p in ROOT.glob("*.py")}  # the package root's modules and setup.py
    missing = (folders | modules | {"pyproject.toml", pyproject["project"]["readme"]}) - copied
    assert not missing, f"Dockerfile.{suffix} does not copy {sorted(missing)}"
    assert not copied & {"tests", ".venv", ".git", "helm", "deploy", "."}, copied


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_pip_installs_the_project_and_checks_its_imports(suffix: str) -> None:
    dest = {d.rstrip("/") for sources, d in copies(suffix) if "pyproject.toml" in sources}
    assert len(dest) == 1
    runs = [a for i, a in instructions(suffix) if i == "RUN"]
    install = [r for r in runs if re.search(rf"pip install --no-cache-dir {re.escape(*dest)}\b",
                                            r)]
    assert install, f"Dockerfile.{suffix}: no `pip install --no-cache-dir {dest}`"
    assert IMPORTS in install[0], "the image should import what the Serve app needs"
    torch_first = [r for r in runs[:runs.index(install[0])] if "torch==${TORCH_VERSION}" in r]
    assert torch_first and "--index-url ${TORCH_INDEX_URL}" in torch_first[0]
    assert "download.pytorch.org/whl/" in args(suffix)["TORCH_INDEX_URL"]
    if suffix == "rocm":
        assert "/whl/rocm" in args(suffix)["TORCH_INDEX_URL"]


def test_the_imports_the_images_rely_on_work_here() -> None:
    run = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_runs_as_ray_without_secrets(suffix: str) -> None:
    instr = instructions(suffix)
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
    labels = " ".join(a for i, a in instructions(suffix) if i == "LABEL")
    assert f'ai.zayaserve.tag-suffix="{suffix}"' in labels
    assert f'org.opencontainers.image.version="{app_version}"' in labels
    text = (ROOT / "deploy" / f"Dockerfile.{suffix}").read_text()
    assert f"Chart tag suffix: {suffix}" in text
    vendor = next(v for v, s in _chart_suffixes().items() if s == suffix)
    assert f"gpu.vendor is {vendor}" in text
    tag = f"{values['image']['repository']}:{app_version}-{suffix}"
    assert f"-f deploy/Dockerfile.{suffix} -t {tag} ." in text, tag
