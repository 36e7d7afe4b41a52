"""After a token is sampled: detokenise it, decide whether the sequence stops, and build the
vLLM-shaped outputs."""

from __future__ import annotations

from zayaserve.replicas.engine.outputs import CompletionOutput, RequestOutput
from zayaserve.replicas.engine.sequence import Request, Sequence


def banned_tokens(seq: Sequence, eos_ids: list[int]) -> tuple[int, ...]:
    """Below min_tokens, no token that would stop the sequence may be sampled."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        return ()
    ids = list(p.stop_token_ids or [])
    if not p.ignore_eos:
        ids.extend(eos_ids)
    return tuple(sorted(set(ids)))


def update_text_and_check_stop(
    seq: Sequence, token: int, eos_ids: list[int], max_model_len: int
) -> None:
    """Sets seq.finish_reason/stop_reason when the newly appended `token` ends the sequence."""
    p = seq.params
    delta = seq.detokenizer.add(token) if seq.detokenizer is not None else ""
    seq.text += delta
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_ids:
            seq.finish_reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        if seq.finish_reason is None and p.stop and delta:
            for stop in p.stop:
                # Only the tail that this token could have completed needs searching.
                at = seq.text.find(stop, max(0, len(seq.text) - len(delta) - len(stop) + 1))
                if at >= 0:
                    end = at + len(stop) if p.include_stop_str_in_output else at
                    seq.text = seq.text[:end]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
    out_of_room = (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or (
        seq.num_tokens >= max_model_len)
    if seq.finish_reason is None and out_of_room:
        seq.finish_reason = "length"
    if seq.finish_reason is not None and seq.detokenizer is not None:
        seq.text += seq.detokenizer.flush()  # bytes held back for an unfinished character


def make_output(req: Request) -> RequestOutput:
    """A snapshot: the sequences' lists are copied, since later steps keep appending to them
    while a consumer may still be reading this output (token_ids and logprobs must agree)."""
    outputs = [
        CompletionOutput(
            index=s.index,
            text=s.text,
            token_ids=s.output_token_ids,
            cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            logprobs=list(s.logprobs) if s.logprobs is not None else None,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
        )
        for s in sorted(req.seqs, key=lambda s: s.index)
    ]
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
        outputs=outputs,
        finished=req.finished,
        num_cached_tokens=req.num_cached_tokens,
    )
