"""The gRPC response messages built from engine outputs: completion deltas (with logprobs when
asked for) and usage."""

from __future__ import annotations

from zayaserve.cluster.frontend.engine_client import EngineClient
from zayaserve.cluster.frontend.logprob_format import token_text
from zayaserve.cluster.protos import generation_pb2 as pb
from zayaserve.replicas.engine.outputs import Logprob, RequestOutput
from zayaserve.replicas.engine.params import SamplingParams


def logprobs_pb(client: EngineClient, token_id: int, entries: dict[int, Logprob],
                 k: int) -> pb.PositionLogprobs:
    def one(tid: int, lp: Logprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=tid, logprob=lp.logprob, rank=lp.rank or 0,
                               token=token_text(client.tokenizer, tid))

    ranked = sorted(entries.items(), key=lambda kv: (-kv[1].logprob, kv[0]))[:k]
    sampled = entries.get(token_id, Logprob(float("-inf")))
    return pb.PositionLogprobs(sampled=one(token_id, sampled),
                               top=[one(t, lp) for t, lp in ranked])


def usage_pb(out: RequestOutput) -> pb.Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion)


def delta_pb(client: EngineClient, params: SamplingParams | None, index: int, text: str,
             token_ids: list[int], logprobs: list[dict[int, Logprob]] | None,
             finish_reason: str | None, stop_reason: int | str | None) -> pb.CompletionDelta:
    """A completion's news (or all of it); params None: no logprobs asked for."""
    delta = pb.CompletionDelta(index=index, text=text, token_ids=token_ids,
                               finish_reason=finish_reason or "")
    if params is not None and params.logprobs is not None and logprobs is not None:
        delta.logprobs.extend(logprobs_pb(client, t, e, params.logprobs)
                              for t, e in zip(token_ids, logprobs, strict=True))
    if isinstance(stop_reason, str):
        delta.stop_str = stop_reason
    elif isinstance(stop_reason, int):
        delta.stop_token_id = stop_reason
    return delta
