"""Markovian RSA through the offline `LLM.rsa` on the tiny model: rounds, answers, the same
answers again, and a bad field refused."""

from __future__ import annotations

from typing import Any

import pytest
from rsa_api_helpers import ENGINE_KW, PROBLEM, RSA


def test_offline_llm_rsa(tiny_checkpoint: Any) -> None:
    from zayaserve import LLM, RSAParams

    llm = LLM(model=str(tiny_checkpoint), **ENGINE_KW)
    messages = [{"role": "user", "content": PROBLEM}]
    result = llm.rsa(messages, RSAParams(**{**RSA, "final_n": 2}))
    assert [r.calls for r in result.rounds] == [4, 4, 2]
    assert len(result.answers) == 2
    again = llm.rsa(messages, **{**RSA, "final_n": 2})
    assert [a.outputs[0].text for a in again.answers] == [
        a.outputs[0].text for a in result.answers]
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="rsa.tail_tokens"):
        llm.rsa(messages, **{**RSA, "tail_tokens": 4000})
