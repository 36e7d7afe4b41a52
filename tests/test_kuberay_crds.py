"""Where the chart's schema tests get KubeRay's CRDs (tests/kuberay_crds.py): a missing CRD fails
with one message naming every place looked at, a download is checked against its pinned sha256
and cached whole or not at all, and a cached copy is not fetched again. Downloads go to a
loopback server here."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading

import kuberay_crds
import pytest
from helm_tools import kuberay_crd_dir


@pytest.fixture
def no_kuberay_crds(monkeypatch, tmp_path):
    """No env folder, no sibling folder, an empty cache; downloads go to loopback only."""
    monkeypatch.delenv(kuberay_crds.ENV_VAR, raising=False)
    monkeypatch.setattr(kuberay_crds, "SIBLING_DIR", tmp_path / "no-sibling")
    monkeypatch.setenv("ZAYASERVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setattr(kuberay_crds, "CRD_BASE_URL", "http://127.0.0.1:9/unreachable/")
    return tmp_path


def one_clear_message(excinfo) -> str:
    message = str(excinfo.value)
    for option in (kuberay_crds.ENV_VAR, str(kuberay_crds.SIBLING_DIR), kuberay_crds.KUBERAY_TAG,
                   kuberay_crds.CRD_BASE_URL, str(kuberay_crds.cache_dir())):
        assert option in message, (option, message)
    assert message.startswith("KubeRay's CRDs are missing")
    return message


@contextlib.contextmanager
def serving(files: dict[str, bytes], requests: list[str] | None = None):
    """An HTTP server on 127.0.0.1 serving `files` by name under /crds/ (404 for anything else);
    yields the base URL. Each requested path is appended to `requests`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if requests is not None:
                requests.append(self.path)
            prefix, _, name = self.path.partition("/crds/")
            body = None if prefix else files.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/crds/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def fake_crds() -> dict[str, bytes]:
    return {name: f"kind: CustomResourceDefinition # {name}\n".encode()
            for name in kuberay_crds.CRD_FILES}


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_a_missing_crd_fails_loudly(no_kuberay_crds, monkeypatch):
    # Nowhere to be had: not set, no sibling, nothing cached, the download refused.
    with pytest.raises(pytest.fail.Exception) as excinfo:
        kuberay_crd_dir()
    assert "download failed" in one_clear_message(excinfo)
    assert not kuberay_crds.cache_dir().exists()
    # A set $ZAYASERVE_KUBERAY_CRDS is the only place looked at: an empty one fails the same way.
    monkeypatch.setenv(kuberay_crds.ENV_VAR, str(no_kuberay_crds))
    with pytest.raises(pytest.fail.Exception) as excinfo:
        kuberay_crd_dir()
    assert f"${kuberay_crds.ENV_VAR}={no_kuberay_crds} lacks" in one_clear_message(excinfo)


def test_a_crd_with_the_wrong_sha256_or_none_at_all_is_refused(no_kuberay_crds, monkeypatch):
    files = fake_crds()
    first, second = kuberay_crds.CRD_FILES
    # The first file matches its pin and is staged; the second does not: nothing is kept.
    pins = sha256s(files) | {second: kuberay_crds.CRD_SHA256[second]}
    monkeypatch.setattr(kuberay_crds, "CRD_SHA256", pins)
    with serving(files) as base:
        monkeypatch.setattr(kuberay_crds, "CRD_BASE_URL", base)
        with pytest.raises(pytest.fail.Exception) as excinfo:
            kuberay_crd_dir()
    message = one_clear_message(excinfo)
    assert (f"{base}{second}: sha256 {hashlib.sha256(files[second]).hexdigest()}, "
            f"expected {kuberay_crds.CRD_SHA256[second]}; refused") in message
    assert not kuberay_crds.cache_dir().exists()
    assert [p.name for p in kuberay_crds.cache_dir().parent.iterdir()] == []  # no leftovers
    # The second file is not there at all (404): refused the same way.
    monkeypatch.setattr(kuberay_crds, "CRD_SHA256", sha256s(files))
    with serving({first: files[first]}) as base:
        monkeypatch.setattr(kuberay_crds, "CRD_BASE_URL", base)
        with pytest.raises(pytest.fail.Exception) as excinfo:
            kuberay_crd_dir()
    assert "404" in one_clear_message(excinfo)
    assert [p.name for p in kuberay_crds.cache_dir().parent.iterdir()] == []  # no leftovers


def test_the_pinned_crds_are_fetched_once_into_the_cache(no_kuberay_crds, monkeypatch):
    files = fake_crds()
    monkeypatch.setattr(kuberay_crds, "CRD_SHA256", sha256s(files))
    requests: list[str] = []
    with serving(files, requests) as base:
        monkeypatch.setattr(kuberay_crds, "CRD_BASE_URL", base)
        folder = kuberay_crd_dir()
    assert sorted(requests) == sorted(f"/crds/{name}" for name in kuberay_crds.CRD_FILES)
    assert folder == kuberay_crds.cache_dir()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no leftovers
    # Cached: no download now (the server is gone).
    assert kuberay_crd_dir() == folder
    assert len(requests) == len(kuberay_crds.CRD_FILES)
