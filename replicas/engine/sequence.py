"""One generated completion (a sequence) and the request that owns one or more of them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from zayaserve.replicas.engine.outputs import Logprob, PromptLogprobs, SampleLogprobs
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.request_timeline import RequestTimeline
from zayaserve.replicas.kv_tiers.hashing import BlockHasher


class Status(enum.Enum):
    WAITING = "waiting"
    FETCHING = "fetching"  # waits for its prefix blocks from L2 (Redis), holding nothing
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    output: Any = None  # the output processor's state (output_processor.RequestState)
    timeline: RequestTimeline = field(default_factory=RequestTimeline)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(
            s.status is Status.FINISHED for s in self.seqs)


@dataclass(slots=True, eq=False)
class Sequence:
    """Tokens known (prompt + output) and how many of them are already in the KV cache."""

    seq_id: int
    request: Request
    index: int  # completion index within its request
    token_ids: list[int]
    seed: int  # keys its draws with the position sampled (see `noise`)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    state_slot: int = -1
    status: Status = Status.WAITING
    forks_pending: int = 0  # children still to spawn at the first sample (n > 1)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output: Any = None  # the output processor's state: its text (output_processor.TextState)
    hasher: BlockHasher | None = None  # prefix caching: chain hash of full blocks
    block_hashes: list[bytes] = field(default_factory=list)
    # L2 prefix fetch: in flight (asked hashes, Future), then its result (hash -> payload)
    # until the sequence is admitted.
    remote_fetch: Any = None
    remote_blocks: dict[bytes, Any] | None = None
    # Structured outputs: the grammar matcher (xgrammar) that every output token advances;
    # `grammar_broken` is set if a token it refused got through (a bug, never valid output).
    grammar: Any = None
    grammar_broken: bool = False
    # Its sampling row, while the row does not change from step to step (see step_sampling).
    sampling_row: Any = None
    prompt_len: int = field(init=False)  # the request's prompt length (it never changes)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.request.prompt_token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params


    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def start_hashing(self, hasher: BlockHasher) -> None:
        self.hasher = hasher
        self.block_hashes = list(hasher.extend(self.token_ids))

    def append(self, token: int, logprob: float, top: dict[int, Logprob] | None) -> None:
        self.token_ids.append(token)
        if self.grammar is not None and not self.grammar.accept_token(token):
            self.grammar_broken = True
        if self.hasher is not None:
            self.block_hashes.extend(self.hasher.extend([token]))
        self.cumulative_logprob += logprob
        if self.logprobs is not None and top is not None:
            self.logprobs.append(top)
