"""The README's main job on a plain install: `deploy/install.sh` (no extras, so no triton,
transformers or pytest) into a fresh venv, then the offline command and API, and the demo
(`zayaserve serve --model tiny` on an embedded local Ray of its own) over REST and gRPC, quiet,
visible to Ray Serve's `serve status`, and stopped by Ctrl-C with every process it started.

The demo runs as a subprocess in a session of its own; everything Ray starts for it stays in
that session (Ray's workers get process groups of their own, not sessions), which is how the
test finds and, if need be, kills them. It never touches this pytest session's Ray (if any)
and never runs `ray stop`."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
HEALTH_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
REQUESTS = 5
MAX_LINES_PER_REQUEST = 2
BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of a user's fresh shell with the plain venv activated: none of this
    test session's venv, kernel or extras settings, nor what its own ray.init (if any) put
    into os.environ (RAY_AUTH_MODE, PYTHONBREAKPOINT)."""
    drop = ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "EXTRAS", "VENV",
            "TRITON_INTERPRET", "ZAYASERVE_KERNEL_BACKEND", "RAY_AUTH_MODE", "PYTHONBREAKPOINT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    ours = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != ours]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["ZAYASERVE_HOME"] = str(home)  # the built-in tiny checkpoint is written here
    return env


class PlainVenv:
    def __init__(self, venv: Path, work: Path) -> None:
        self.venv = venv
        self.work = work  # the working directory of every command (not the repository)
        self.env = _clean_env(venv, work / "home")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlainVenv]:
    base = tmp_path_factory.mktemp("plain")
    venv = base / "venv"
    env = _clean_env(venv, base / "home")
    env["VENV"] = str(venv)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh")], cwd=base, env=env,
                          capture_output=True, text=True, timeout=1500)
    took = time.monotonic() - t0
    print(f"\n[plain install] deploy/install.sh into a fresh venv: {took:.0f} s")
    assert proc.returncode == 0, f"install.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    try:
        yield PlainVenv(venv, base)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1.5 GB; pytest keeps old tmp dirs around


def test_install_is_plain_and_has_the_commands(plain: PlainVenv) -> None:
    proc = plain.run(plain.bin("python"), "-c", "import triton")
    assert proc.returncode != 0 and "No module named 'triton'" in proc.stderr, proc.stderr
    proc = plain.run(plain.bin("python"), "-c", "import torch; print(torch.__version__)")
    assert proc.returncode == 0 and proc.stdout.startswith("2.13.0"), proc.stderr
    for script in ("zayaserve", "serve"):
        assert Path(plain.bin(script)).is_file(), f"{script} is not installed"


def test_generate_command(plain: PlainVenv) -> None:
    t0 = time.monotonic()
    proc = plain.run(plain.bin("zayaserve"), "generate", "--model", "tiny", "--max-tokens", "8",
                     "--temperature", "0", "Hello")
    print(f"\n[plain install] zayaserve generate: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.strip(), f"no text printed; stderr:\n{proc.stderr[-4000:]}"


def test_offline_api(plain: PlainVenv) -> None:
    code = ("from zayaserve import LLM, SamplingParams\n"
            "params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)\n"
            "out = LLM(model='tiny').generate(['Hello'], params)[0].outputs[0]\n"
            "print(len(out.token_ids)); print(repr(out.text))\n")
    proc = plain.run(plain.bin("python"), "-c", code)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.splitlines()[0] == "8", proc.stdout


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "(gone)"


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(predicate, timeout: float, what: str, log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; output:\n"
                         + log.read_text(errors="replace")[-6000:])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()


def _status_command(plain: PlainVenv, lines: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `serve status` command the banner prints, run from the plain venv's bin."""
    found = [ln.split("status:", 1)[1].strip() for ln in lines if ln.strip().startswith("status:")]
    assert found, "the banner names no `serve status` command:\n" + "\n".join(lines)
    words = shlex.split(found[0])
    env = dict(plain.env)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["serve", "status"], found[0]
    return [plain.bin("serve"), *words[1:]], env


def test_demo_serves_quietly_and_stops(plain: PlainVenv) -> None:
    http_port, grpc_port, dash_port = _free_ports(3)
    log = plain.work / "serve.log"
    # A short Ray temp root of its own (Unix socket paths must stay short).
    ray_tmp = tempfile.mkdtemp(prefix="zsray")
    env = {**plain.env, "RAY_TMPDIR": ray_tmp}
    cmd = [plain.bin("zayaserve"), "serve", "--model", "tiny", "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--dashboard-port", str(dash_port)]
    base = f"http://127.0.0.1:{http_port}"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=plain.work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sid = proc.pid
    try:
        _wait_for(lambda: proc.poll() is not None or _healthy(base + "/health"),
                  HEALTH_TIMEOUT_S, "GET /health == 200", log)
        assert proc.poll() is None, "zayaserve serve exited:\n" + log.read_text()[-6000:]
        _wait_for(lambda: any("Ctrl-C to stop" in ln for ln in _lines(log)), 60,
                  "the banner", log)
        print(f"\n[plain install] zayaserve serve ready: {time.monotonic() - t0:.0f} s")

        # REST: the OpenAI completions endpoint.
        r = httpx.post(base + "/v1/completions", json=BODY, timeout=120)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert choices and choices[0]["text"] is not None, r.json()
        # Structured outputs need the `structured` extra: a plain install says what to install
        # (400), and goes on serving.
        r = httpx.post(base + "/v1/completions", timeout=120, json={
            **BODY, "structured_outputs": {"choice": ["yes", "no"]}})
        assert r.status_code == 400 and "zayaserve[structured]" in r.json()["error"]["message"], (
            r.text)

        # gRPC: the standard health service says SERVING.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Ray Serve's own CLI sees the app through the embedded cluster's dashboard.
        status_cmd, status_env = _status_command(plain, _lines(log))
        st = subprocess.run(status_cmd, cwd=plain.work, env=status_env, capture_output=True,
                            text=True, timeout=120)
        assert st.returncode == 0, f"{status_cmd}:\n{st.stdout}\n{st.stderr[-4000:]}"
        assert "zayaserve" in st.stdout and "RUNNING" in st.stdout, st.stdout

        # Quiet: a few requests add at most a couple of lines each (no access logs of the
        # deployments' internal calls). Ray's log monitor forwards with a delay: settle first.
        time.sleep(5)
        before = len(_lines(log))
        for _ in range(REQUESTS):
            r = httpx.post(base + "/v1/completions", json=BODY, timeout=120)
            assert r.status_code == 200, r.text
        time.sleep(5)
        lines = _lines(log)
        added = lines[before:]
        print(f"[plain install] output lines: {before} until ready, {len(added)} for "
              f"{REQUESTS} requests")
        assert len(added) <= MAX_LINES_PER_REQUEST * REQUESTS, "\n".join(added)
        calls = [ln for ln in lines if re.search(r" -- CALL \w+ OK ", ln)]
        assert not calls, "internal calls are access-logged:\n" + "\n".join(calls[:10])

        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        t1 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"not stopped {STOP_TIMEOUT_S} s after SIGINT:\n"
                        + log.read_text()[-4000:])
        print(f"[plain install] stopped {time.monotonic() - t1:.0f} s after SIGINT (rc {rc})")
        assert rc == 0, log.read_text()[-4000:]
        # Every process of the embedded Ray (its workers included) goes with it.
        deadline = time.monotonic() + 30
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(1)
        left = {pid: _cmdline(pid) for pid in _session_pids(sid)}
        assert not left, f"processes of the embedded Ray outlived it: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        _kill_session(sid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
