"""Parameters of a Markovian RSA run, and what a run can cost before it starts.

Defaults are Zyphra's published ZAYA1 settings (N=32, K=4, T=8, tau=4096, 32,768 tokens per
middle round, 61,440 for the final one, final sampling 0.6 / 0.95 / 40). Middle rounds sample
at temperature 1.0 with top_p/top_k off: the population's diversity is what aggregation feeds
on, so the intermediate rounds sample from the model's unmodified distribution and only the
answer-producing round is sharpened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zayaserve.replicas.validation_errors import ParamError

# The range SamplingParams (and torch.Generator.manual_seed) accepts for a seed.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1

# Placeholders a custom aggregation template must hold (see prompts.aggregation_prompt).
TEMPLATE_PLACEHOLDERS = ("{problem}", "{traces}")
# An aggregation prompt is rendered and tokenized for every call of a round: keep it small.
MAX_TEMPLATE_CHARS = 16_384


class FinalSampling(BaseModel):
    """How the final round samples; the ranges are SamplingParams' (and vLLM's).

    Defaults are given as `default=` throughout (here and in RSAParams): mypy's
    dataclass_transform only counts that spelling as a default, so `RSAParams(n=4)` type-checks.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    temperature: float = Field(
        default=0.6, ge=0.0, allow_inf_nan=False,
        description="Temperature of the final round (0 = greedy).")
    top_p: float = Field(
        default=0.95, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Nucleus mass of the final round, in (0, 1]; 1 = off.")
    top_k: int = Field(
        default=40, ge=-1,
        description="Top-k of the final round; 0 or -1 = off (-1 is stored as 0).")

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, value: int) -> int:
        # SamplingParams normalises -1 (vLLM's spelling of "off") to 0; keep one spelling here.
        return 0 if value == -1 else value


class RSAParams(BaseModel):
    """One Markovian RSA run: a population of `n` traces refined over `t` aggregation rounds.

    Round 0 samples `n` traces from the problem. Each later round samples new members, each
    from an aggregation prompt holding the problem and `k` traces of the round before, every
    one cut to its last `tail_tokens` tokens. The last round (round `t`) makes `final_n`
    calls, which produce the answer. `t == 0` is a plain generation: `final_n` calls on the
    problem itself, with the final round's sampling and token budget.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    n: int = Field(default=32, ge=1, description="Population size: traces generated per round.")
    k: int = Field(
        default=4, ge=1,
        description="Traces of the previous round shown in each aggregation prompt (clamped "
        "to n).")
    t: int = Field(
        default=8, ge=0,
        description="Aggregation rounds after round 0; the last one gives the answer. 0 = a "
        "plain generation.")
    tail_tokens: int = Field(
        default=4096, ge=1,
        description="tau: tokens carried from each trace into the next round (its last ones), "
        "the Markovian bound on a prompt's length.")
    carry: Literal["reasoning_tail", "answer_else_reasoning_tail"] = Field(
        default="reasoning_tail",
        description="What a trace carries: the end of its reasoning (before the last "
        "</think>), or its answer when it has one and the reasoning's end otherwise.")
    round_max_tokens: int = Field(
        default=32768, ge=1, description="max_tokens of each call in rounds 0 to t-1.")
    final_max_tokens: int = Field(
        default=61440, ge=1, description="max_tokens of each call of the final round.")
    final_n: int = Field(
        default=1, ge=1, description="Calls of the final round (answers returned).")
    round_temperature: float = Field(
        default=1.0, ge=0.0, allow_inf_nan=False,
        description="Temperature of rounds 0 to t-1 (top_p and top_k off).")
    final_sampling: FinalSampling = Field(
        default_factory=FinalSampling, description="Sampling of the final round.")
    seed: int | None = Field(
        default=None, ge=_SEED_MIN, le=_SEED_MAX,
        description="Seed of the whole run: every call and every subset draw derives its own "
        "from it. None = unseeded.")
    aggregation_template: str | None = Field(
        default=None,
        description="Aggregation prompt with {problem} and {traces} placeholders; None = the "
        "built-in one.")
    return_population: bool = Field(
        default=False, description="Also return every round's traces, not only the answers.")

    @field_validator("aggregation_template")
    @classmethod
    def _template_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"aggregation_template: at most {MAX_TEMPLATE_CHARS} characters, "
                             f"got {len(value)}")
        # Exactly once each: the cost check counts the traces once, and every copy of
        # {traces} would be filled with all of them.
        wrong = [f"{p} {value.count(p)} times" for p in TEMPLATE_PLACEHOLDERS
                 if value.count(p) != 1]
        if wrong:
            raise ValueError(
                f"aggregation_template must contain {' and '.join(TEMPLATE_PLACEHOLDERS)} "
                f"exactly once each; it has {', '.join(wrong)}")
        return value

    @property
    def effective_k(self) -> int:
        """Traces per aggregation prompt: k, but never more than the population holds."""
        return min(self.k, self.n)

    @classmethod
    def from_flat(cls, body: Mapping[str, Any]) -> RSAParams | None:
        """The run asked for by a request body's flat `rsa_*` keys (Zyphra's spelling), or None
        when it has none, so an ordinary request passes through untouched.

        Keys set to null count as absent (clients send unset optionals as null), so a body
        whose `rsa_*` keys are all null gives None too. An unknown `rsa_*` key, or both
        `rsa_tail_tokens` and its alias `rsa_tau`, is a ParamError naming the key, as is an
        invalid value: a typo must not silently fall back to a default.
        """
        fields: dict[str, Any] = {}
        source: dict[str, str] = {}
        for key, value in body.items():
            if not isinstance(key, str) or not key.startswith("rsa_"):
                continue
            name = FLAT_KEYS.get(key)
            if name is None:
                known = ", ".join(sorted(FLAT_KEYS))
                raise ParamError(key, f"unknown RSA parameter {key!r}; known: {known}")
            if value is None:
                continue
            if name in fields:
                raise ParamError(
                    "rsa_tau", "rsa_tau is an alias of rsa_tail_tokens: give one of them, not both")
            fields[name] = value
            source[name] = key
        if not fields:
            return None
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            first = err.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else ""
            key = source.get(name, "rsa")
            raise ParamError(key, f"{key}: {first['msg']}") from err


# Flat request keys (Zyphra's drop-in names) and the RSAParams field each one sets.
FLAT_KEYS: dict[str, str] = {
    "rsa_n": "n",
    "rsa_k": "k",
    "rsa_t": "t",
    "rsa_tail_tokens": "tail_tokens",
    "rsa_tau": "tail_tokens",
    "rsa_carry": "carry",
    "rsa_round_max_tokens": "round_max_tokens",
    "rsa_final_max_tokens": "final_max_tokens",
    "rsa_final_n": "final_n",
    "rsa_seed": "seed",
    "rsa_return_population": "return_population",
}


def call_counts(p: RSAParams) -> list[int]:
    """Engine calls per round, round 0 first; the list has t + 1 entries.

    Round 0 makes n calls on the problem; rounds 1 to t-1 make n aggregation calls each; round
    t, the final round, makes final_n aggregation calls. So t >= 1 gives [n] * t + [final_n]
    (t=1: round 0, then the final round aggregating it), and t == 0 gives [final_n]: a plain
    generation, nothing to aggregate.
    """
    if p.t == 0:
        return [p.final_n]
    return [p.n] * p.t + [p.final_n]


def _aggregation_prompt_tokens(p: RSAParams, prompt_tokens: int, template_tokens: int) -> int:
    # An upper bound: the tails are decoded and re-encoded in the prompt, which can shift a
    # count by a token here and there; template_tokens is the caller's allowance for that too.
    return prompt_tokens + template_tokens + p.effective_k * p.tail_tokens


def _calls(p: RSAParams, prompt_tokens: int, template_tokens: int) -> list[tuple[str, int, int]]:
    """(kind, prompt bound, max_tokens) of one call of each round, in round order; kind is
    `first` (round 0), `middle` (rounds 1..t-1) or `final` (round t, or round 0 when t == 0)."""
    if p.t == 0:
        return [("final", prompt_tokens, p.final_max_tokens)]
    aggregate = _aggregation_prompt_tokens(p, prompt_tokens, template_tokens)
    middle = [("middle", aggregate, p.round_max_tokens)] * (p.t - 1)
    return [("first", prompt_tokens, p.round_max_tokens), *middle,
            ("final", aggregate, p.final_max_tokens)]


def _check_counts(prompt_tokens: int, template_tokens: int) -> None:
    if prompt_tokens < 0 or template_tokens < 0:
        raise ValueError(
            f"token counts must be >= 0, got prompt {prompt_tokens}, template {template_tokens}")


def worst_case_tokens(p: RSAParams, prompt_tokens: int, template_tokens: int) -> int:
    """Prompt plus completion tokens summed over every call of the run, every call assumed to
    use its whole max_tokens: what admission control charges before the run starts.

    `prompt_tokens` is the problem's prompt; an aggregation call's prompt is bounded by
    prompt_tokens + template_tokens + effective_k * tail_tokens.
    """
    _check_counts(prompt_tokens, template_tokens)
    calls = _calls(p, prompt_tokens, template_tokens)
    return sum(count * (prompt + completion)
               for count, (_, prompt, completion) in zip(call_counts(p), calls, strict=True))


def max_context(p: RSAParams, prompt_tokens: int, template_tokens: int) -> int:
    """The longest prompt + completion any single call can reach (it must fit max_model_len)."""
    _check_counts(prompt_tokens, template_tokens)
    return max(prompt + completion for _, prompt, completion in
               _calls(p, prompt_tokens, template_tokens))


def _context_culprit(p: RSAParams, prompt_tokens: int, template_tokens: int) -> str:
    """The field to blame for the longest call: of the parts RSA controls in that call (the
    carried tails, effective_k * tail_tokens, and its max_tokens), the larger one."""
    kind, _, completion = max(_calls(p, prompt_tokens, template_tokens),
                                   key=lambda call: call[1] + call[2])
    budget = "final_max_tokens" if kind == "final" else "round_max_tokens"
    aggregates = kind == "middle" or (kind == "final" and p.t > 0)
    if aggregates and p.effective_k * p.tail_tokens > completion:
        return "rsa.tail_tokens"
    return f"rsa.{budget}"


def check_budget(
    p: RSAParams,
    prompt_tokens: int,
    template_tokens: int,
    max_total_tokens: int,
    max_model_len: int,
) -> None:
    """Refuse, before any call is made, a run that could not finish within the server's limits.

    The per-call limit is checked first: it names the one field to lower (`rsa.tail_tokens`,
    `rsa.round_max_tokens` or `rsa.final_max_tokens`), which is the more useful message. Then
    the whole run's worst case against `max_total_tokens` (param `rsa`: many fields share it).
    """
    longest = max_context(p, prompt_tokens, template_tokens)
    if longest > max_model_len:
        field = _context_culprit(p, prompt_tokens, template_tokens)
        raise ParamError(
            field, f"an RSA call can reach {longest} tokens (prompt, carried traces and "
            f"max tokens), more than max_model_len={max_model_len}; lower {field}")
    total = worst_case_tokens(p, prompt_tokens, template_tokens)
    if total > max_total_tokens:
        calls = sum(call_counts(p))
        raise ParamError(
            "rsa", f"the RSA run's worst case is {total} tokens over {calls} calls, more than "
            f"this server's limit of {max_total_tokens}; lower rsa.n, rsa.t or the token budgets")
