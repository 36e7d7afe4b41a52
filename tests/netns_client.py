"""A caller that is not on the server's loopback, on one machine: a network namespace of the
test's own with a veth pair (link-local addresses, nothing routed anywhere), from which an HTTP
request reaches a server bound to 0.0.0.0 through the host end's address. Needs root and
iproute2 (`ip netns`), as CI has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

REQUEST = """
import json, sys, time, httpx
method, url, headers, body = json.loads(sys.argv[1])
for attempt in range(10):  # a new veth link takes a moment to carry traffic
    try:
        r = httpx.request(method, url, headers=headers, json=body, timeout=60)
        break
    except httpx.ConnectError if attempt < 9 else ():
        time.sleep(1)
    except httpx.ConnectTimeout if attempt < 9 else ():
        pass
print(json.dumps({"status": r.status_code, "body": r.text}))
"""


@dataclass
class RemoteCaller:
    namespace: str
    host_address: str  # the server's address as the namespace reaches it

    def request(self, method: str, port: int, path: str, headers: dict[str, str] | None = None,
                body: object = None) -> tuple[int, str]:
        url = f"http://{self.host_address}:{port}{path}"
        run = subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c",
                              REQUEST, json.dumps([method, url, headers or {}, body])],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        answer = json.loads(run.stdout.splitlines()[-1])
        return int(answer["status"]), str(answer["body"])


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def remote_caller() -> Iterator[RemoteCaller]:
    tag = f"zs{os.getpid() % 100000}"
    ns, host_end, ns_end = f"{tag}ns", f"{tag}h", f"{tag}n"
    host_ip, ns_ip = "169.254.77.1", "169.254.77.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_end)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield RemoteCaller(ns, host_ip)
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
