from __future__ import annotations

from typing import Any

import pytest

from zayaserve.replicas.engine.outputs import CompletionOutput, Logprob, RequestOutput
from zayaserve.replicas.engine.params import MAX_LOGPROBS, SamplingParams
from zayaserve.replicas.validation_errors import ParamError


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k) == (1, 1.0, 1.0, 0)
    assert p.seed is None and p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy
    assert p.min_p == 0.0 and p.repetition_penalty == 1.0
    assert p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
    assert not p.has_penalties


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", -3),
        ("n", 1.5),
        ("n", "2"),
        ("n", True),
        ("temperature", -1.0),
        ("temperature", -1e-9),
        ("temperature", "hot"),
        ("temperature", None),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", -0.1),
        ("top_p", 1.01),
        ("top_p", "all"),
        ("top_k", -2),
        ("top_k", 2.5),
        ("top_k", "5"),
        ("seed", 1.5),
        ("seed", "42"),
        ("seed", 2**64),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("min_tokens", 1.0),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", "5"),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("prompt_logprobs", 2.0),
        ("stop", [""]),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop", 3),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", 7),
        ("stop_token_ids", [True]),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
        ("include_stop_str_in_output", None),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("min_p", float("nan")),
        ("min_p", float("inf")),
        ("min_p", "0.1"),
        ("min_p", None),
        ("min_p", True),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", "1.2"),
        ("repetition_penalty", None),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.01),
        ("presence_penalty", float("nan")),
        ("presence_penalty", float("-inf")),
        ("presence_penalty", "0.5"),
        ("presence_penalty", [0.5]),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", float("nan")),
        ("frequency_penalty", False),
        ("frequency_penalty", None),
    ],
)
def test_validation_error_names_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_shows_bad_value() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1.0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match=rf"logprobs must be <= {MAX_LOGPROBS}, got 21"):
        SamplingParams(logprobs=21)


def test_sampling_extras_ranges_and_normalisation() -> None:
    p = SamplingParams(min_p=1, repetition_penalty=2, presence_penalty=-2, frequency_penalty=2)
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (
        1.0, 2.0, -2.0, 2.0)
    assert all(isinstance(v, float) for v in (p.min_p, p.repetition_penalty,
                                              p.presence_penalty, p.frequency_penalty))
    assert p.has_penalties
    assert SamplingParams(repetition_penalty=1e-3).has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert not SamplingParams(min_p=0.5).has_penalties  # min_p is a filter, not a penalty
    with pytest.raises(ValueError, match=r"min_p must be in \[0, 1\], got 1.5"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match=r"frequency_penalty must be in \[-2, 2\], got 2.5"):
        SamplingParams(frequency_penalty=2.5)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        SamplingParams(repetition_penalty=0)
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        with pytest.raises(ParamError) as err:
            SamplingParams(**{name: float("nan")})
        assert err.value.param == name


def test_min_tokens_bounded_by_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


def test_normalisations() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    p = SamplingParams(temperature=0, top_p=1)
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0.9, top_k=1).greedy
    assert not SamplingParams(temperature=0.5, top_k=2).greedy


def test_child_seed() -> None:
    p = SamplingParams(n=3, seed=100)
    assert [p.child_seed(i) for i in range(3)] == [100, 101, 102]
    assert SamplingParams(n=2).child_seed(1) is None
    with pytest.raises(ValueError, match="index"):
        p.child_seed(3)
    top = SamplingParams(n=2, seed=2**64 - 1)
    assert top.child_seed(0) == 2**64 - 1
    child = top.child_seed(1)
    assert child is not None and -(2**63) <= child <= 2**64 - 1 and child != 2**64 - 1


def test_output_types() -> None:
    lp = Logprob(-0.5)
    assert lp.rank is None and lp.decoded_token is None
    c = CompletionOutput(0, "hi", [1, 2], -1.0, [{1: lp}, {2: Logprob(-0.5, 1, "x")}])
    assert not c.finished() and c.stop_reason is None
    c.finish_reason = "stop"
    assert c.finished()
    r = RequestOutput("r0", "p", [7], None, [c], finished=True)
    assert r.num_cached_tokens == 0
    assert "CompletionOutput(index=0, text='hi'" in repr(r)
