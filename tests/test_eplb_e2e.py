"""EPLB on a real local Ray Serve: a checkpoint whose router biases skew the load Zipf-wise,
served by four expert shards with four redundant expert copies. The controller sees the skew in
the shards' counts, plans hot-expert replicas, loads them in the background and commits a new
epoch: balancedness goes from the contiguous layout's (below 0.8) to about 0.9 (at least 0.85
on the load measured after it), and every answer stays the offline engine's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import MAX_TOKENS, PROMPTS, Cluster, Load, deploy, undeploy, wait_for

from zayaserve.replicas.devtools.skewed_checkpoint import write_skewed_checkpoint

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def skewed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_skewed_checkpoint(tmp_path_factory.mktemp("skewed") / "zipf", strength=0.1)


@pytest.fixture(scope="module")
def balanced(ray_session: None, skewed_model: Path) -> Iterator[Cluster]:
    c = deploy(model=str(skewed_model), expert_shards=4, engine={"max_num_seqs": 8},
               eplb={"enabled": True, "interval_s": 8, "window_s": 3, "redundant_experts": 4})
    yield c
    undeploy()


def _want(model: Path) -> dict[str, str]:
    from zayaserve import LLM, SamplingParams

    llm = LLM(model=str(model))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True))
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs, strict=True)}


def test_eplb_replicates_hot_experts_and_balances_the_shards(balanced: Cluster,
                                                             skewed_model: Path) -> None:
    want = _want(skewed_model)
    seen: dict[str, Any] = {}
    with Load(balanced, want=want, model="zipf", n=8) as load:
        def measured_before() -> bool:
            v = balanced.placement_view()
            if v["rebalances"] == 0 and v["balancedness"] is not None \
                    and sum(v["expert_load"]) > 0 and v["observed_balancedness"] is not None:
                seen["before"] = v
            return "before" in seen and load.done >= 8

        wait_for(measured_before, 120, "load on the initial layout")
        wait_for(lambda: balanced.placement_view()["rebalances"] >= 1, 120, "a rebalance")
        wait_for(lambda: balanced.placement_view()["pending"] is None, 120, "its commit")
        served = load.done
        wait_for(lambda: load.done >= served + 16, 180, "answers on the new epoch")
        after = balanced.placement_view()
    before = seen["before"]
    print("eplb balancedness before", before["balancedness"], "after", after["balancedness"],
          "observed before", before["observed_balancedness"], "after",
          after["observed_balancedness"], "load", after["expert_load"])
    assert not load.failures, load.failures[:3]  # no failed request, no changed token
    assert after["epoch"] > before["epoch"]
    # "after" is the new placement judged on the load measured after it (an EWMA over 3 s of
    # 8 streams), not the load it was planned from: that load moves by a few percent, and so
    # does the figure (0.91, 0.904 and 0.889 in three runs). The plan must lift it well clear.
    assert before["balancedness"] < 0.8 and after["balancedness"] >= 0.85
    assert after["balancedness"] - before["balancedness"] >= 0.3
    copies = sum(len(s["experts"]) for s in after["shards"] if s["state"] == "serving")
    assert copies == 8 + 4  # every expert once, plus the four redundant copies
    hottest = max(range(8), key=lambda e: after["expert_load"][e])
    assert sum(hottest in s["experts"] for s in after["shards"]) >= 2
