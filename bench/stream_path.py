"""Per-token cost of the streaming output path, from the engine's output to the client's SSE
bytes, over one long stream (default 4,000 tokens, n=4): today's `StepDelta` path against the
path it replaced (cumulative outputs re-cut at every hop, `bench/legacy_stream_path.py`), in
one run. No model runs: each step appends one token (4 characters, a logprob) to each of the n
completions, so only the output path is timed. Both paths pickle what crosses the worker ->
ingress hop (Ray does) and JSON-encode each SSE chunk.

    python -m zayaserve.bench.stream_path [--tokens 4000] [--n 4]
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from collections.abc import Callable

from zayaserve.bench import legacy_stream_path as legacy
from zayaserve.replicas.engine.output_processor import OutputProcessor, TextState, TokenRecord
from zayaserve.replicas.engine.outputs import Logprob
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.sequence import Request, Sequence


def _request(n: int, tokens: int) -> tuple[Request, list[Sequence]]:
    params = SamplingParams(n=n, max_tokens=tokens, logprobs=1, ignore_eos=True)
    req = Request("bench", None, [2, 3, 4, 5], params, 0)
    seqs = [Sequence(i, req, i, [2, 3, 4, 5], i, logprobs=[])
            for i in range(n)]
    req.seqs.extend(seqs)
    return req, seqs


def _advance(seqs: list[Sequence], step: int, processor: OutputProcessor
             ) -> list[tuple[TokenRecord, TextState]]:
    """One token per completion, with its text already made (the detokenizer's part is not
    what this bench times)."""
    group = []
    for s in seqs:
        token = 10 + (step + s.index) % 400
        top = {token: Logprob(-1.0, 1)}
        s.append(token, -1.0, top)
        state = processor.text_state(s)
        state.text += f"t{step % 100:02d} "[:4]
        group.append((TokenRecord(s, token, top, s.cumulative_logprob, None, None, False),
                      state))
    return group


def _chunk(index: int, text: str, token_ids: list[int] | tuple[int, ...]) -> bytes:
    return json.dumps({"choices": [{"index": index, "text": text,
                                    "token_ids": list(token_ids)}]}).encode()


def run_path(name: str, n: int, tokens: int) -> list[float]:
    """Seconds per step (one token per completion) of one path."""
    req, seqs = _request(n, tokens)
    processor = OutputProcessor(None)
    group: list[tuple[TokenRecord, TextState]] = []
    step_fn: Callable[[], None]
    if name == "legacy":
        enc, dec = legacy.Encoder(), legacy.Decoder()
        cursors = [legacy.Cursor() for _ in range(n)]

        def step_fn() -> None:
            wire = pickle.loads(pickle.dumps(enc.encode(legacy.make_output(req))))
            for c in dec.apply(wire):
                text, ids, _ = cursors[c.index].advance(c)
                _chunk(c.index, text, ids)
    else:
        def step_fn() -> None:
            delta = pickle.loads(pickle.dumps(processor.request_delta(req, list(group))))
            for c in delta.completions:
                _chunk(c.index, c.text, c.token_ids)

    times = []
    for step in range(tokens):
        group = _advance(seqs, step, processor)
        t = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--buckets", type=int, default=8)
    args = p.parse_args(argv)
    results = {name: run_path(name, args.n, args.tokens) for name in ("legacy", "StepDelta")}
    size = args.tokens // args.buckets
    print(f"per-token cost (us per generated token, n={args.n}), by token index:")
    print("| tokens | legacy path | StepDelta path | legacy / StepDelta |")
    print("|---|---|---|---|")
    for b in range(args.buckets):
        lo, hi = b * size, (b + 1) * size
        per = {k: sum(v[lo:hi]) / (hi - lo) / args.n * 1e6 for k, v in results.items()}
        print(f"| {lo}-{hi} | {per['legacy']:.1f} | {per['StepDelta']:.1f} "
              f"| {per['legacy'] / per['StepDelta']:.1f}x |")
    for k, v in results.items():
        first, last = sum(v[:size]) / size, sum(v[-size:]) / size
        print(f"{k}: last bucket / first bucket = {last / first:.2f}")


if __name__ == "__main__":
    main()
