"""`zayaserve scale`: resize a running cluster over its REST admin API (POST /v1/cluster/scale),
then, with --wait, follow the operation until it is done or failed. It sends the admin key
(--api-key-file, else $ZAYASERVE_ADMIN_API_KEY; a cluster without one answers loopback
callers only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from zayaserve.cluster.control.admin_auth import ADMIN_ENV_VAR


def add_scale_parser(sub: Any) -> None:
    p = sub.add_parser("scale", help="resize a running cluster (expert shards, workers)")
    p.add_argument("--expert-shards", type=int, default=None)
    p.add_argument("--attention-workers", type=int, default=None)
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the cluster's REST address (default http://127.0.0.1:8000)")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the admin key (default: $ZAYASERVE_ADMIN_API_KEY)")
    p.add_argument("--wait", action="store_true", help="follow the operation to its end")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits")
    p.set_defaults(func=run_scale)


def _call(url: str, key: str | None, body: dict[str, Any] | None = None
          ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer); a 429's Retry-After comes back as answer["retry_after_s"]."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        try:
            answer = json.loads(err.read())
        except ValueError:
            answer = {"error": {"message": err.reason}}
        if err.headers.get("Retry-After", "").isdigit():
            answer["retry_after_s"] = int(err.headers["Retry-After"])
        return err.code, answer


def _admin_key(key_file: str | None) -> str | None:
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as err:
            raise ValueError(f"--api-key-file: cannot read {key_file!r} ({err.strerror})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"--api-key-file: {key_file!r} holds no key")
        return lines[0]
    return os.environ.get(ADMIN_ENV_VAR) or None


def run_scale(args: argparse.Namespace) -> int:
    if args.expert_shards is None and args.attention_workers is None:
        raise ValueError("scale: give --expert-shards and/or --attention-workers")
    key = _admin_key(args.api_key_file)
    base = args.url.rstrip("/")
    deadline = time.monotonic() + args.timeout
    while True:
        status, answer = _call(f"{base}/v1/cluster/scale", key, {
            "expert_shards": args.expert_shards, "attention_workers": args.attention_workers})
        wait = answer.get("retry_after_s")
        # Within the cluster's cooldown after the last resize: --wait waits it out.
        if status != 429 or not args.wait or wait is None or (
                time.monotonic() + wait > deadline):
            break
        print(f"zayaserve: the last resize was less than the cooldown ago; retrying in "
              f"{wait} s", file=sys.stderr, flush=True)
        time.sleep(wait)
    if status >= 400:
        print(f"zayaserve: error: HTTP {status}: {answer.get('error', {}).get('message')}",
              file=sys.stderr)
        return 1
    op = answer["operation"]
    print(f"operation {op['id']}: {op['phase']} ({op['detail']})", flush=True)
    if not args.wait:
        return 0
    last = op["detail"]
    while op["phase"] not in ("done", "failed"):
        if time.monotonic() > deadline:
            print(f"zayaserve: error: operation {op['id']} still {op['phase']} after "
                  f"{args.timeout:g} s", file=sys.stderr)
            return 1
        time.sleep(0.5)
        status, op = _call(f"{base}/v1/cluster/operations/{op['id']}", key)
        if status >= 400:
            print(f"zayaserve: error: HTTP {status}: {op.get('error', {}).get('message')}",
                  file=sys.stderr)
            return 1
        if op["detail"] != last:
            last = op["detail"]
            print(f"operation {op['id']}: {op['phase']} ({last}) epoch {op['epoch']}",
                  flush=True)
    return 0 if op["phase"] == "done" else 1
