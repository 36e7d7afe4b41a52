"""KubeRay's CRDs (ray.io_rayservices.yaml, ray.io_rayclusters.yaml) for the chart's schema tests.

Looked for in this order:
1. `$ZAYASERVE_KUBERAY_CRDS`, a folder holding both files. When it is set it is the only place
   looked at: a wrong folder fails rather than quietly checking against something else.
2. `../shared/kuberay/` beside the repository (a workspace that keeps the CRDs there).
3. The cache, `${ZAYASERVE_HOME:-~/.cache/zayaserve}/tools/kuberay-<tag>-crds/`.
4. A download of the two files from KubeRay's release tag (raw.githubusercontent.com), each
   checked against its pinned sha256 before it is written; they go into the cache whole or not
   at all.
With none of these, `crd_dir()` raises `CRDsUnavailable` with one message naming all of them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

ENV_VAR = "ZAYASERVE_KUBERAY_CRDS"
SIBLING_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay"

# KubeRay tag v1.7.0 (ray-project/kuberay commit 59d663aeec13760646da3db9c1cf8cfe883e30b7,
# 2026-08-19), helm-chart/kuberay-operator/crds/. The digests were checked against that tag's
# files (byte-identical to ../shared/kuberay/, the CRDs the tests were written against).
KUBERAY_TAG = "v1.7.0"
CRD_BASE_URL = ("https://raw.githubusercontent.com/ray-project/kuberay/"
                f"{KUBERAY_TAG}/helm-chart/kuberay-operator/crds/")
CRD_SHA256 = {
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
}
CRD_FILES = tuple(CRD_SHA256)
FETCH_TIMEOUT_S = 60
MAX_CRD_BYTES = 16 << 20  # the real ones are about 1 MiB each


class CRDsUnavailable(RuntimeError):
    """None of the places gave KubeRay's CRDs; the message says what to do."""


def cache_dir() -> Path:
    home = Path(os.environ.get("ZAYASERVE_HOME", Path.home() / ".cache" / "zayaserve"))
    return home / "tools" / f"kuberay-{KUBERAY_TAG}-crds"


def crd_dir() -> Path:
    """The folder holding both CRD files (fetched on first use when nothing else has them)."""
    env = os.environ.get(ENV_VAR)
    if env:
        if _complete(Path(env)):
            return Path(env)
        raise CRDsUnavailable(_message(f"${ENV_VAR}={env} lacks {_missing(Path(env))}; "
                                       f"unset it for (2) and (3)"))
    if _complete(SIBLING_DIR):
        return SIBLING_DIR
    cached = cache_dir()
    if _complete(cached):
        return cached
    try:
        fetch(cached)
    except Exception as e:  # any failure: the one message below, with its cause
        raise CRDsUnavailable(_message(f"{ENV_VAR} is not set, {SIBLING_DIR} lacks "
                                       f"{_missing(SIBLING_DIR)}, nothing is cached and the "
                                       f"download failed: {e}")) from e
    return cached


def fetch(target: Path) -> None:
    """Downloads the pinned CRDs, checks each one's sha256 and puts both in `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "crds"
        staging.mkdir()
        for name, expected in CRD_SHA256.items():
            url = CRD_BASE_URL + name
            data = _download(url)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise RuntimeError(f"{url}: sha256 {digest}, expected {expected}; refused")
            (staging / name).write_bytes(data)
        # Whole or not at all: a concurrent or interrupted fetch never leaves half a folder.
        try:
            staging.rename(target)
        except OSError:
            if not _complete(target):
                raise


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
        data = response.read(MAX_CRD_BYTES + 1)
    if len(data) > MAX_CRD_BYTES:
        raise RuntimeError(f"{url}: larger than {MAX_CRD_BYTES} bytes; refused")
    return data


def _complete(folder: Path) -> bool:
    return not _missing(folder)


def _missing(folder: Path) -> str:
    return " and ".join(name for name in CRD_FILES if not (folder / name).is_file())


def _message(why: str) -> str:
    return (f"KubeRay's CRDs are missing ({why}). The chart's CRD checks need "
            f"{' and '.join(CRD_FILES)} (KubeRay's helm-chart/kuberay-operator/crds/); give them "
            f"one of three ways: (1) set {ENV_VAR} to a folder holding both (when set, the only "
            f"place looked at); (2) put them in {SIBLING_DIR}; (3) let the tests download them "
            f"from KubeRay's release {KUBERAY_TAG}, {CRD_BASE_URL}<name> (each checked against "
            f"its sha256 pinned in tests/kuberay_crds.py), into {cache_dir()}, which needs that "
            f"host reachable, or put the two files there by hand.")
