"""Reasoning parser for models that think inside `<think>...</think>` (ZAYA1, Qwen3-style
templates): the thinking moves to `reasoning_content`, the rest stays `content`, in whole
messages and in stream deltas.

A completion is in thinking mode from its start when the rendered prompt ends inside an open
`<think>` (templates that open it in the generation prompt), or once it writes `<think>` itself;
`</think>` ends it. In a stream a tag may arrive split over deltas: the text that could still
be the start of a tag is held back until the next delta (or the end) decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """The prompt leaves a `<think>` open for the completion to fill."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


@dataclass
class ThinkParser:
    """Splits one completion's text as it arrives; `feed` returns (reasoning, content)."""

    thinking: bool = False
    started: bool = False  # has any text been seen (a leading <think> opens thinking)
    _held: str = field(default="", repr=False)
    _after_close: bool = field(default=False, repr=False)  # drop newlines after </think>

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        if self._after_close:
            text = text.lstrip("\n")
            self._after_close = not text
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            tag = CLOSE if self.thinking else OPEN
            at = text.find(tag)
            if not self.thinking and at != -1 and (text[:at].strip() or self.started):
                at = -1  # <think> only opens thinking at the start of the completion
            if at == -1:
                keep = 0 if final else partial_tag(text, tag)
                if not self.thinking and self.started:
                    keep = 0  # content mid-answer: a later <think> is plain text
                body, self._held = text[:len(text) - keep], text[len(text) - keep:]
                (reasoning if self.thinking else content).append(body)
                if body.strip():
                    self.started = True
                break
            (reasoning if self.thinking else content).append(text[:at])
            text = text[at + len(tag):]
            self.thinking = not self.thinking
            self.started = True
            if not self.thinking:  # the blank line templates put after </think>
                text = text.lstrip("\n")
                self._after_close = not text
        return "".join(reasoning), "".join(content)


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, prompt_thinking: bool) -> tuple[str | None, str | None]:
    """A whole completion as (reasoning_content, content); None where there is none."""
    parser = ThinkParser(thinking=prompt_thinking, started=prompt_thinking)
    reasoning, content = parser.feed(text, final=True)
    return (reasoning if reasoning or parser.thinking or prompt_thinking else None,
            content or None)


@dataclass(frozen=True)
class ReasoningMode:
    """How one chat request's completions are split (off unless the server runs the parser)."""

    enabled: bool = False
    prompt_thinking: bool = False
    include: bool = True  # False: the reasoning is dropped, only content is returned

    @staticmethod
    def of(parser: str | None, include: bool, prompt: str) -> ReasoningMode:
        if parser is None:
            return ReasoningMode()
        return ReasoningMode(True, prompt_opens_thinking(prompt), include)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole completion."""
        if not self.enabled:
            return None, text
        reasoning, content = split_reasoning(text, self.prompt_thinking)
        return (reasoning if self.include else None), content

    def stream(self) -> ThinkParser:
        return ThinkParser(thinking=self.prompt_thinking, started=self.prompt_thinking)
