"""The engine measures its requests' time to first token and inter-token latency as they run
(what an attention worker reports for the autoscaler's latency targets)."""

from __future__ import annotations

from typing import Any


def test_engine_records_ttft_at_first_token_and_itl_at_finish(tiny_checkpoint: Any) -> None:
    from zayaserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_checkpoint))
    engine = llm.engine
    assert engine.latency_percentiles().samples == 0
    engine.add_request("a", [2, 40, 41], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.step()
    while engine.latency_percentiles().samples == 0:  # the prefill step gives the first token
        engine.step()
    mid = engine.latency_percentiles()
    assert mid.ttft_s is not None and mid.ttft_s > 0 and mid.itl_s is None  # not finished yet
    while engine.has_unfinished_requests():
        engine.step()
    done = engine.latency_percentiles()
    assert done.samples == 1 and done.itl_s is not None and done.itl_s > 0
    llm.generate(["x"] * 4, SamplingParams(max_tokens=1))  # one token: a TTFT, no ITL
    assert engine.latency_percentiles().samples == 5


def test_itl_of_n_sequences_counts_the_longest() -> None:
    """The decode time runs until the longest sequence ends: its tokens divide it, not the
    mean (10 and 1000 tokens would otherwise read twice as slow)."""
    from zayaserve.replicas.engine.latency_window import LatencyWindow
    from zayaserve.replicas.engine.request_timeline import RequestTimeline

    window = LatencyWindow()
    timeline = RequestTimeline(None, window)
    timeline.arrival -= 2.0
    timeline.first_token = timeline.arrival + 1.0  # then ~1 s of decoding
    m = timeline.finish([10, 1000], ["stop", "length"])
    itl = window.percentiles(0.5).itl_s
    assert itl is not None and abs(itl - m.decode_s / 999) < 1e-9
