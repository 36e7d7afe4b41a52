"""What one RSA trace carries into the next round, and the aggregation prompt built from it.

The Markovian bound: a new member sees the problem and only the last `tail_tokens` tokens of
each of its K parents, so a prompt's length is bounded whatever the round, and the total cost
grows linearly in the number of rounds rather than with the whole history.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CARRY_MODES = ("reasoning_tail", "answer_else_reasoning_tail")

# Everything fixed (the instructions, then the problem) comes before the candidates: the calls
# of a round differ only from the first candidate on, so the prefix cache serves everything
# before it to every call after the round's first.
DEFAULT_AGGREGATION_TEMPLATE = """\
You are given a problem and several candidate solutions produced by independent attempts. \
Each candidate shows only the final part of its attempt, so it may begin mid-sentence.

Work through the candidates critically. Check each step of their reasoning and arithmetic, \
note where they agree and where they disagree, and identify any errors or gaps. Several \
candidates, or even all of them, may be wrong, so do not settle the question by majority alone. \
Then write a single improved solution that is complete and self-contained (it must not refer \
to the candidates), and end it with a clearly stated final answer.

Problem:
{problem}

Candidate solutions:
{traces}

Now write your improved solution to the problem."""

# Only these two placeholders are substituted, in one pass: any other braces in a template
# (LaTeX, JSON examples) are literal, and a `{traces}` inside the problem text stays as written.
_PLACEHOLDER = re.compile(r"\{(problem|traces)\}")


def _last_occurrence(haystack: Sequence[int], needle: Sequence[int]) -> int:
    """Start of the last occurrence of `needle` in `haystack`, or -1 (also for an empty needle)."""
    width = len(needle)
    if width == 0 or width > len(haystack):
        return -1
    target = list(needle)
    first = target[0]
    for start in range(len(haystack) - width, -1, -1):
        if haystack[start] == first and list(haystack[start:start + width]) == target:
            return start
    return -1


def carry_tail(
    output_ids: Sequence[int],
    think_end_ids: Sequence[int],
    mode: str,
    tail_tokens: int,
) -> list[int]:
    """The token ids one trace passes on: at most `tail_tokens`, a suffix of the chosen region.

    `think_end_ids` is the tokenization of `</think>` (empty when the tokenizer has none; then
    the whole output counts as reasoning). `reasoning_tail` keeps the end of the reasoning, the
    part before the last `</think>` (the whole output when the model never closed its thinking,
    e.g. when it ran out of tokens). `answer_else_reasoning_tail` keeps the end of the text after
    the last `</think>` when there is any, and falls back to the reasoning tail otherwise, so a
    trace that never reached an answer still contributes its latest thinking.
    """
    if mode not in CARRY_MODES:
        raise ValueError(f"carry mode must be one of {CARRY_MODES}, got {mode!r}")
    if tail_tokens < 1:
        raise ValueError(f"tail_tokens must be >= 1, got {tail_tokens}")
    ids = list(output_ids)
    end = _last_occurrence(ids, think_end_ids)
    reasoning = ids if end < 0 else ids[:end]
    region = reasoning
    if mode == "answer_else_reasoning_tail" and end >= 0:
        answer = ids[end + len(think_end_ids):]
        if answer:
            region = answer
    return region[-tail_tokens:]


def format_traces(traces: Sequence[str]) -> str:
    """The traces as numbered blocks ("Candidate 1:", ...), the text that fills `{traces}`."""
    return "\n\n".join(f"Candidate {i}:\n{trace}" for i, trace in enumerate(traces, start=1))


def aggregation_prompt(problem: str, traces: Sequence[str], template: str | None = None) -> str:
    """The user message of one aggregation call: `template` (or the default) with the problem
    and the numbered traces filled in."""
    if not traces:
        raise ValueError("an aggregation prompt needs at least one trace")
    text = DEFAULT_AGGREGATION_TEMPLATE if template is None else template
    values = {"problem": problem, "traces": format_traces(traces)}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)
