"""A plain CPU install has no triton: every module except the `*_triton` kernels must import
without it, the offline engine must generate on the torch kernels, and every op's torch
implementation must load.

Each check runs in a fresh interpreter whose first act is to put a finder on `sys.meta_path`
that refuses `triton` (and its submodules) and records who asked: a zayaserve module asking at
all fails the test, so a guarded `try: import triton` counts too, not only an unguarded one.
(torch's own guarded probes, e.g. `torch.utils._triton.has_triton_package`, are allowed.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BLOCK_TRITON = '''
import importlib.abc, sys, traceback
ATTEMPTS = []  # imports of triton asked for by a zayaserve module: each one is a failure
OTHERS = []  # asked for by a dependency (torch probes for triton and copes without it)
def _importer():
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            who = _importer()
            record = ATTEMPTS if who.split(".")[0] == "zayaserve" else OTHERS
            record.append(f"{who} imported {name}:\\n" + "".join(traceback.format_stack()[:-1]))
            raise ImportError(f"No module named {name!r} (blocked by test_no_triton)")
        return None
sys.meta_path.insert(0, _NoTriton())
'''


IMPORT_ALL = '''
import importlib, json, pkgutil
import zayaserve
checked, failures = [], {}
def _walk_error(name):
    failures[name] = "".join(traceback.format_exception(*sys.exc_info()))
for info in pkgutil.walk_packages(zayaserve.__path__, "zayaserve.", onerror=_walk_error):
    name = info.name
    if name.endswith("_triton"):
        continue  # the Triton kernels: the only modules allowed to need triton
    before = len(ATTEMPTS)
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc()
    if len(ATTEMPTS) > before:
        failures[name] = "asked for triton:\\n" + "\\n".join(ATTEMPTS[before:])
    checked.append(name)
print(json.dumps({"checked": checked, "failures": failures, "attempts": ATTEMPTS}))
'''

GENERATE = '''
import json
from zayaserve import LLM, SamplingParams
from zayaserve.kernels import registry
# ignore_eos: the tiny model's random weights may pick EOS; 4 tokens must come back regardless.
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
outs = LLM(model="tiny").generate(["Hello"], params)
ops = {}
for op in registry.OPS:
    fn = registry.get_op(op, "torch")
    ops[op] = fn.__module__ + ":" + fn.__name__
print(json.dumps({"tokens": outs[0].outputs[0].token_ids, "kernels": registry.default_kernels(),
                  "default_ops": {op: registry.get_op(op).__module__ for op in registry.OPS},
                  "torch_ops": ops, "attempts": ATTEMPTS}))
'''


def run_without_triton(body: str, tmp_path: Path) -> dict:
    # A clean kernel environment: no forced kernel set, no interpreter (the kernel tests set
    # TRITON_INTERPRET=1 in this process), built-in checkpoints written under tmp_path.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "ZAYASERVE_KERNELS", "ZAYASERVE_KERNEL_BACKEND")}
    env["ZAYASERVE_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TRITON + body], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"subprocess printed nothing; stderr:\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_every_module_but_the_triton_kernels_imports_without_triton(tmp_path: Path) -> None:
    result = run_without_triton(IMPORT_ALL, tmp_path)
    failures = result["failures"]
    assert not failures, "\n\n".join(f"== {name}\n{err}" for name, err in failures.items())
    assert not result["attempts"], "\n".join(result["attempts"])
    checked = set(result["checked"])
    for name in ("cache_encoding_ref", "cca_decode_ref", "fused_moe_ref", "paged_attention_ref",
                 "registry"):
        assert f"zayaserve.kernels.{name}" in checked
    assert "zayaserve.replicas.model.attention_side" in checked
    assert not any(name.endswith("_triton") for name in checked)


@pytest.mark.slow
def test_engine_generates_on_torch_kernels_without_triton(tmp_path: Path) -> None:
    result = run_without_triton(GENERATE, tmp_path)
    assert len(result["tokens"]) == 4, result
    assert result["kernels"] == "torch"
    assert not result["attempts"], "\n".join(result["attempts"])
    for op, module in result["default_ops"].items():
        assert module.endswith("_ref"), (op, module)
    assert result["torch_ops"] == {
        "fused_moe": "zayaserve.kernels.fused_moe_ref:fused_moe_ref",
        "paged_attention": "zayaserve.kernels.paged_attention_ref:paged_attention_torch",
        "cca_decode": "zayaserve.kernels.cca_decode_ref:cca_decode_ref",
        "kv_quantize": "zayaserve.kernels.cache_encoding_ref:quantize_ref",
        "kv_dequantize": "zayaserve.kernels.cache_encoding_ref:dequantize_ref",
    }
