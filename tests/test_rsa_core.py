"""The engine-independent core of Markovian RSA: parameters, budgets, seeds, carried tails and
aggregation prompts."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from zayaserve.replicas.rsa.params import (
    FinalSampling,
    RSAParams,
    call_counts,
    check_budget,
    max_context,
    worst_case_tokens,
)
from zayaserve.replicas.rsa.prompts import (
    DEFAULT_AGGREGATION_TEMPLATE,
    aggregation_prompt,
    carry_tail,
)
from zayaserve.replicas.rsa.seeds import choose_subsets, derive_seed
from zayaserve.replicas.validation_errors import ParamError

# --- parameters ---------------------------------------------------------------------------


def test_defaults_are_zyphras_settings() -> None:
    p = RSAParams()
    assert (p.n, p.k, p.t, p.tail_tokens) == (32, 4, 8, 4096)
    assert (p.round_max_tokens, p.final_max_tokens, p.final_n) == (32768, 61440, 1)
    assert p.final_sampling == FinalSampling(temperature=0.6, top_p=0.95, top_k=40)
    assert p.round_temperature == 1.0 and p.seed is None and p.carry == "reasoning_tail"
    assert all(field.description for field in RSAParams.model_fields.values())
    assert all(field.description for field in FinalSampling.model_fields.values())


@pytest.mark.parametrize(("t", "expected"), [(0, [2]), (1, [5, 2]), (3, [5, 5, 5, 2])])
def test_call_counts(t: int, expected: list[int]) -> None:
    assert call_counts(RSAParams(n=5, t=t, final_n=2)) == expected


def test_effective_k_is_clamped_to_the_population() -> None:
    assert RSAParams(n=3, k=4).effective_k == 3
    assert RSAParams(n=8, k=4).effective_k == 4


@pytest.mark.parametrize("bad", [
    {"n": 0}, {"k": 0}, {"t": -1}, {"tail_tokens": 0}, {"n": True}, {"n": "4"},
    {"round_temperature": -0.1}, {"round_temperature": float("nan")}, {"carry": "answer"},
    {"unknown": 1}, {"final_sampling": {"top_p": 0.0}}, {"final_sampling": {"top_k": -2}},
    {"final_sampling": {"temperature": -1.0}}, {"seed": 2**64},
])
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RSAParams.model_validate(bad)


def test_top_k_minus_one_means_off() -> None:
    assert FinalSampling(top_k=-1).top_k == 0
    assert FinalSampling(top_p=1.0, temperature=0.0).top_p == 1.0


def test_custom_template_needs_both_placeholders() -> None:
    with pytest.raises(ValidationError) as info:
        RSAParams(aggregation_template="Solve {problem} again.")
    assert info.value.errors()[0]["loc"] == ("aggregation_template",)
    assert "aggregation_template" in str(info.value) and "{traces}" in str(info.value)
    ok = RSAParams(aggregation_template="P: {problem}\nT: {traces}")
    assert ok.aggregation_template is not None


def test_from_flat_reads_zyphras_keys() -> None:
    p = RSAParams.from_flat({
        "model": "m", "rsa_n": 6, "rsa_k": 2, "rsa_t": 3, "rsa_tau": 128,
        "rsa_carry": "answer_else_reasoning_tail", "rsa_round_max_tokens": 500,
        "rsa_final_max_tokens": 900, "rsa_final_n": 2, "rsa_seed": 7,
        "rsa_return_population": True,
    })
    assert p is not None
    assert (p.n, p.k, p.t, p.tail_tokens, p.carry) == (6, 2, 3, 128, "answer_else_reasoning_tail")
    assert (p.round_max_tokens, p.final_max_tokens, p.final_n) == (500, 900, 2)
    assert p.seed == 7 and p.return_population is True
    long_name = RSAParams.from_flat({"rsa_tail_tokens": 64})
    assert long_name is not None and long_name.tail_tokens == 64 and long_name.n == 32


def test_from_flat_without_rsa_keys_is_none() -> None:
    assert RSAParams.from_flat({"model": "m", "n": 3, "temperature": 0.5}) is None
    assert RSAParams.from_flat({"rsa_n": None}) is None


@pytest.mark.parametrize(("body", "param"), [
    ({"rsa_n": 4, "rsa_rounds": 3}, "rsa_rounds"),
    ({"rsa_tail_tokens": 8, "rsa_tau": 8}, "rsa_tau"),
    ({"rsa_k": 0}, "rsa_k"),
    ({"rsa_tau": "big"}, "rsa_tau"),
])
def test_from_flat_errors_name_the_key(body: dict[str, object], param: str) -> None:
    with pytest.raises(ParamError) as info:
        RSAParams.from_flat(body)
    assert info.value.param == param
    assert param in str(info.value)


# --- budgets ------------------------------------------------------------------------------

SMALL = {"n": 3, "k": 2, "tail_tokens": 10, "round_max_tokens": 100, "final_max_tokens": 200}


def test_worst_case_and_max_context_by_hand() -> None:
    # prompt 5, template 7: an aggregation prompt is 5 + 7 + 2 * 10 = 32 tokens.
    p = RSAParams(t=2, **SMALL)  # round 0: 3 x 105, round 1: 3 x 132, final: 1 x 232
    assert worst_case_tokens(p, 5, 7) == 315 + 396 + 232
    assert max_context(p, 5, 7) == 232
    one = RSAParams(t=1, **SMALL)
    assert worst_case_tokens(one, 5, 7) == 315 + 232
    plain = RSAParams(t=0, final_n=2, **SMALL)  # two plain calls of 5 + 200
    assert worst_case_tokens(plain, 5, 7) == 410 and max_context(plain, 5, 7) == 205
    clamped = RSAParams(n=1, k=4, t=1, tail_tokens=10, round_max_tokens=100,
                        final_max_tokens=200)  # aggregation prompt 5 + 7 + 1 * 10
    assert worst_case_tokens(clamped, 5, 7) == 105 + 222


def test_check_budget_passes_at_the_limits() -> None:
    check_budget(RSAParams(t=2, **SMALL), 5, 7, max_total_tokens=943, max_model_len=232)


def test_check_budget_refuses_a_run_over_the_total() -> None:
    with pytest.raises(ParamError) as info:
        check_budget(RSAParams(t=2, **SMALL), 5, 7, max_total_tokens=942, max_model_len=10**6)
    assert info.value.param == "rsa"
    assert "943" in str(info.value) and "942" in str(info.value)


@pytest.mark.parametrize(("overrides", "param"), [
    ({}, "rsa.final_max_tokens"),  # the final call, 32 + 200, is the longest
    ({"tail_tokens": 150}, "rsa.tail_tokens"),  # 2 x 150 carried > 200 max tokens
    ({"round_max_tokens": 300, "final_max_tokens": 50}, "rsa.round_max_tokens"),  # middle
    ({"round_max_tokens": 400, "final_max_tokens": 50, "t": 1}, "rsa.round_max_tokens"),
])
def test_check_budget_names_the_field_of_the_longest_call(
        overrides: dict[str, int], param: str) -> None:
    p = RSAParams.model_validate({"t": 2, **SMALL, **overrides})
    limit = max_context(p, 5, 7) - 1
    with pytest.raises(ParamError) as info:
        check_budget(p, 5, 7, max_total_tokens=10**9, max_model_len=limit)
    assert info.value.param == param
    assert str(limit) in str(info.value)


def test_check_budget_plain_generation_blames_final_max_tokens() -> None:
    with pytest.raises(ParamError) as info:
        check_budget(RSAParams(t=0, **SMALL), 5, 7, max_total_tokens=10**9, max_model_len=204)
    assert info.value.param == "rsa.final_max_tokens"


# --- seeds and subsets --------------------------------------------------------------------


def test_derive_seed_is_stable_distinct_and_in_range() -> None:
    assert derive_seed(None, 1, 2) is None
    assert derive_seed(11, 2, 3) == derive_seed(11, 2, 3)
    seeds = {derive_seed(11, 2, i) for i in range(64)}
    assert len(seeds) == 64
    assert derive_seed(11, 2, 3) != derive_seed(12, 2, 3)
    assert derive_seed(11, 2, 3) != derive_seed(11, 3, 2)
    assert all(s is not None and 0 <= s < 2**63 for s in seeds)
    assert derive_seed(-5) is not None


def test_choose_subsets_shape_and_distinct_members() -> None:
    for population, k in [(8, 4), (3, 4), (1, 1), (5, 5)]:
        subsets = choose_subsets(3, 1, population, k, count=20)
        assert len(subsets) == 20
        for subset in subsets:
            assert len(subset) == min(k, population)
            assert len(set(subset)) == len(subset)
            assert all(0 <= i < population for i in subset)
    assert choose_subsets(3, 1, 8, 4, count=0) == []


def test_choose_subsets_reproducible_for_a_seed() -> None:
    for seed in (0, 1, 12345):
        for round_index in (1, 2, 7):
            first = choose_subsets(seed, round_index, 32, 4, 32)
            assert first == choose_subsets(seed, round_index, 32, 4, 32)


def test_choose_subsets_differ_across_seeds_and_rounds() -> None:
    draws = [choose_subsets(seed, r, 32, 4, 32) for seed in (0, 1, 2, 3) for r in (1, 2)]
    assert len({repr(d) for d in draws}) > 1
    assert choose_subsets(0, 1, 32, 4, 32) != choose_subsets(1, 1, 32, 4, 32)
    assert choose_subsets(0, 1, 32, 4, 32) != choose_subsets(0, 2, 32, 4, 32)


def test_choose_subsets_uses_the_given_rng() -> None:
    a = choose_subsets(None, 1, 10, 3, 5, rng=random.Random(4))
    assert a == choose_subsets(None, 1, 10, 3, 5, rng=random.Random(4))
    unseeded = choose_subsets(None, 1, 10, 3, 5)
    assert all(len(set(s)) == 3 for s in unseeded)
    with pytest.raises(ValueError):
        choose_subsets(1, 1, 0, 3, 5)


# --- carried tails ------------------------------------------------------------------------

END = [90]  # a one-token </think>
END2 = [90, 91]  # a two-token </think>


def _is_suffix(part: list[int], whole: list[int]) -> bool:
    return not part or whole[-len(part):] == part


@pytest.mark.parametrize("mode", ["reasoning_tail", "answer_else_reasoning_tail"])
def test_no_think_end_keeps_the_end_of_the_output(mode: str) -> None:
    out = [1, 2, 3, 4, 5]
    assert carry_tail(out, END, mode, 3) == [3, 4, 5]
    assert carry_tail(out, [], mode, 3) == [3, 4, 5]  # tokenizer without </think>
    assert carry_tail(out, END, mode, 10) == out  # tail longer than the region


def test_reasoning_tail_stops_at_the_last_think_end() -> None:
    out = [1, 2, 90, 3, 4, 90, 7, 8]
    assert carry_tail(out, END, "reasoning_tail", 3) == [90, 3, 4]
    assert carry_tail(out, END, "reasoning_tail", 100) == [1, 2, 90, 3, 4]
    assert _is_suffix(carry_tail(out, END, "reasoning_tail", 2), out[:5])


def test_answer_mode_prefers_the_answer() -> None:
    out = [1, 2, 3, 90, 7, 8, 9]
    assert carry_tail(out, END, "answer_else_reasoning_tail", 2) == [8, 9]
    assert carry_tail(out, END, "answer_else_reasoning_tail", 50) == [7, 8, 9]
    # Nothing after </think>: the reasoning's end instead.
    assert carry_tail([1, 2, 3, 90], END, "answer_else_reasoning_tail", 2) == [2, 3]


def test_multi_token_think_end() -> None:
    out = [5, 90, 6, 90, 91, 7, 8]  # a lone 90 is not the marker
    assert carry_tail(out, END2, "reasoning_tail", 10) == [5, 90, 6]
    assert carry_tail(out, END2, "answer_else_reasoning_tail", 10) == [7, 8]
    partial = [5, 6, 90]  # the marker cut short by max_tokens: no marker at all
    assert carry_tail(partial, END2, "reasoning_tail", 2) == [6, 90]


def test_carry_tail_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        carry_tail([1], END, "everything", 3)
    with pytest.raises(ValueError):
        carry_tail([1], END, "reasoning_tail", 0)


# --- aggregation prompts ------------------------------------------------------------------


def test_default_prompt_holds_problem_and_numbered_traces() -> None:
    traces = ["first try {x}", "second try", "third try"]
    text = aggregation_prompt("What is 2 + {2}?", traces)
    assert "What is 2 + {2}?" in text
    for i, trace in enumerate(traces, start=1):
        assert f"Candidate {i}:\n{trace}" in text
    assert text.index("Candidate 1:") < text.index("Candidate 2:") < text.index("Candidate 3:")
    assert "{problem}" in DEFAULT_AGGREGATION_TEMPLATE
    assert "{traces}" in DEFAULT_AGGREGATION_TEMPLATE
    assert "{problem}" not in text and "{traces}" not in text


def test_custom_template_is_used_and_other_braces_are_literal() -> None:
    template = "Q={problem} | {traces} | \\frac{a}{b}"
    text = aggregation_prompt("P {traces}", ["t1", "t2"], template)
    assert text == "Q=P {traces} | Candidate 1:\nt1\n\nCandidate 2:\nt2 | \\frac{a}{b}"
    with pytest.raises(ValueError):
        aggregation_prompt("P", [])
