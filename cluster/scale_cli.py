"""`zayaserve scale`: resize a running cluster over its REST admin API (POST /v1/cluster/scale),
then, with --wait, follow the operation until it is done or failed."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def add_scale_parser(sub: Any) -> None:
    p = sub.add_parser("scale", help="resize a running cluster (expert shards, workers)")
    p.add_argument("--expert-shards", type=int, default=None)
    p.add_argument("--attention-workers", type=int, default=None)
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the cluster's REST address (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $ZAYASERVE_API_KEY); prefer the variable")
    p.add_argument("--wait", action="store_true", help="follow the operation to its end")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits")
    p.set_defaults(func=run_scale)


def _call(url: str, key: str | None, body: dict[str, Any] | None = None
          ) -> tuple[int, dict[str, Any]]:
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
            return err.code, json.loads(err.read())
        except ValueError:
            return err.code, {"error": {"message": err.reason}}


def run_scale(args: argparse.Namespace) -> int:
    if args.expert_shards is None and args.attention_workers is None:
        raise ValueError("scale: give --expert-shards and/or --attention-workers")
    key = args.api_key or os.environ.get("ZAYASERVE_API_KEY")
    base = args.url.rstrip("/")
    status, answer = _call(f"{base}/v1/cluster/scale", key, {
        "expert_shards": args.expert_shards, "attention_workers": args.attention_workers})
    if status >= 400:
        print(f"zayaserve: error: HTTP {status}: {answer.get('error', {}).get('message')}",
              file=sys.stderr)
        return 1
    op = answer["operation"]
    print(f"operation {op['id']}: {op['phase']} ({op['detail']})", flush=True)
    if not args.wait:
        return 0
    deadline, last = time.monotonic() + args.timeout, op["detail"]
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
