"""The package root is lazy: importing `zayaserve`, the kernels or the request router (which
Serve loads by its dotted path) must not pull in the engine and torch; `zayaserve.LLM` and the
other offline names still resolve on first use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import zayaserve

CHECK = '''
import json, sys
import zayaserve, zayaserve.kernels.registry, zayaserve.replicas.serve_request_router
before = {"engine": "zayaserve.replicas.engine.llm_engine" in sys.modules,
          "llm": "zayaserve.replicas.llm" in sys.modules, "torch": "torch" in sys.modules}
llm = zayaserve.LLM
print(json.dumps({"before": before, "llm": f"{llm.__module__}.{llm.__qualname__}",
                  "engine_after": "zayaserve.replicas.engine.llm_engine" in sys.modules}))
'''


def test_root_import_stays_light_and_llm_resolves() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] == {"engine": False, "llm": False, "torch": False}
    assert result["llm"] == "zayaserve.replicas.llm.LLM"
    assert result["engine_after"]


def test_offline_names_resolve() -> None:
    from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from zayaserve.replicas.engine.params import SamplingParams
    from zayaserve.replicas.llm import LLM

    assert (zayaserve.LLM, zayaserve.SamplingParams, zayaserve.RequestOutput,
            zayaserve.CompletionOutput, zayaserve.Logprob) == (
        LLM, SamplingParams, RequestOutput, CompletionOutput, Logprob)
    assert set(zayaserve.__all__) <= set(dir(zayaserve))
    assert zayaserve.__version__ == "0.1.0"
    with pytest.raises(AttributeError, match="NoSuchName"):
        zayaserve.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
