"""A plain install of what ships, as a user gets it: `deploy/install.sh` (no extras) builds the
wheel and installs it non-editable into a fresh venv; every command then runs from a folder
outside the checkout, in the environment of a user's fresh shell with that venv activated.

Also the process-session helpers the demo's test uses to find (and, if need be, kill)
everything an embedded Ray started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The package's source folders: every .py below them must be in the wheel.
PACKAGE_FOLDERS = ("cluster", "replicas", "router", "kernels", "bench")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of a user's fresh shell with the plain venv activated: none of this
    test session's venv, kernel or extras settings, nor what its own ray.init (if any) put
    into os.environ (RAY_AUTH_MODE, PYTHONBREAKPOINT)."""
    drop = ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "EXTRAS", "VENV",
            "TRITON_INTERPRET", "ZAYASERVE_KERNELS", "ZAYASERVE_KERNEL_BACKEND", "RAY_AUTH_MODE",
            "PYTHONBREAKPOINT")
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
        self.env = clean_env(venv, work / "home")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def site_packages(self) -> Path:
        (site,) = self.venv.glob("lib/python3*/site-packages")
        return site

    def run(self, *args: str, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.work, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)


def install_plain(base: Path) -> PlainVenv:
    """`deploy/install.sh` into `base/venv`, run from `base` (outside the checkout)."""
    venv = base / "venv"
    env = clean_env(venv, base / "home")
    env["VENV"] = str(venv)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh")], cwd=base, env=env,
                          capture_output=True, text=True, timeout=1500)
    print(f"\n[plain install] deploy/install.sh into a fresh venv: "
          f"{time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, f"install.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return PlainVenv(venv, base)


# ---- the processes of a session --------------------------------------------------------------

def session_pids(sid: int) -> list[int]:
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "(gone)"


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; output:\n"
                         + log.read_text(errors="replace")[-6000:])


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
