"""Each image's install step, run as far as a venv can without a container engine: the files
its COPY lines bring in (and only those), its own `pip install` line on them (a wheel built
from exactly those files, installed non-editable), its own import check, then `zayaserve serve
--print-serve-config` from outside the checkout. A Dockerfile that would build an image that
cannot start fails here.

The base image's Python packages (torch, Ray) are stood in for by the plain venv's (the `plain`
fixture): each image gets a venv of its own that sees those through a .pth file, so the step
installs only zayaserve itself, into that venv."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import ROOT, SUFFIXES, args, copies, instructions
from plain_venv import PlainVenv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SRC = "/tmp/zayaserve-src"


def _stage(suffix: str, where: Path) -> Path:
    """The image's build context as its COPY lines leave it under SRC."""
    src = where / "zayaserve-src"
    for sources, dest in copies(suffix):
        if not dest.rstrip("/").startswith(SRC):
            continue
        target = src / Path(dest).relative_to(SRC)
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
    return src


def _install_step(suffix: str, src: Path) -> str:
    """The image's RUN line that installs the project, with its ARGs and SRC filled in."""
    runs = [a for i, a in instructions(suffix) if i == "RUN" and re.search(
        rf"pip install [^&]*{re.escape(SRC)}\b", a)]
    assert len(runs) == 1, f"Dockerfile.{suffix}: {len(runs)} RUN lines install {SRC}"
    line = runs[0]
    for name, value in args(suffix).items():
        line = line.replace(f"${{{name}}}", value)
    return line.replace(SRC, str(src))


def _image_venv(plain: PlainVenv, where: Path) -> tuple[Path, dict[str, str]]:
    """A venv of its own over the plain venv's packages (the base image's stand-in)."""
    venv = where / "venv"
    subprocess.run([plain.bin("python"), "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "zz_base_image.pth").write_text(f"{plain.site_packages()}\n")
    env = {**plain.env, "PATH": f"{venv / 'bin'}:{plain.env['PATH']}",
           "VIRTUAL_ENV": str(venv)}
    # `pip` of the image is the base's pip, installing into this venv.
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -m pip "$@"\n')
    (venv / "bin" / "pip").chmod(0o755)
    return venv, env


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_images_install_step_gives_a_server_that_starts(
        suffix: str, plain: PlainVenv, tmp_path: Path) -> None:
    src = _stage(suffix, tmp_path)
    step = _install_step(suffix, src)
    venv, env = _image_venv(plain, tmp_path)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", step], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"Dockerfile.{suffix}: `{step}` failed:\n{run.stderr[-6000:]}"
    assert not src.exists(), "the step removes its build context"
    (site,) = venv.glob("lib/python3*/site-packages")
    assert (site / "zayaserve" / "cluster" / "app.py").is_file(), "not installed into the venv"
    # Every module of the checkout's package folders reached the image.
    (dist,) = site.glob("zayaserve-*.dist-info")
    record = {ln.split(",", 1)[0] for ln in (dist / "RECORD").read_text().splitlines()}
    for folder in ("cluster", "replicas", "router", "kernels", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = f"zayaserve/{path.relative_to(ROOT)}"
            assert "__pycache__" in path.parts or rel in record, f"{suffix}: {rel} missing"

    cfg = subprocess.run([str(venv / "bin" / "zayaserve"), "serve", "--model", "tiny",
                          "--print-serve-config"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stderr[-6000:]
    (app,) = yaml.safe_load(cfg.stdout)["applications"]
    assert app["import_path"] == "zayaserve.cluster.app:build_app", app
    # The printed config imports in this image: what Serve does first on every node.
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import zayaserve.cluster.app as a; print(a.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stderr
