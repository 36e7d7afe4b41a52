"""Markovian RSA inside the engine vs the same procedure driven from outside over REST.

REST servers in this process (uvicorn on 127.0.0.1, the `small` preset by default), each with
its own engine, run one RSA procedure (N traces, K per aggregation prompt, T rounds, tails of
tail_tokens tokens) three ways:

* in-engine: one POST /v1/chat/completions with `rsa`, on the server with prefix caching;
* outside-uncached: a driver here doing what Zyphra's proxy does (each round's plain chat calls
  sent concurrently, each reply's text cut to its tail and put into the next round's prompts,
  with the server's seeds and sampling) against a server WITHOUT prefix caching, as the engines
  that proxy drives cannot cache ZAYA's CCA state: the faithful baseline;
* outside-cached: the same driver against the cached server: a stronger baseline.

By default the problem is short and decode dominates (a random-weight model never emits EOS).
--problem-tokens N pads the problem with a seeded passage to about N tokens: prefill-heavy.
After a warm-up the modes alternate (order rotating) for --repeats repeats; each repeat has a
fresh seed and each (repeat, mode) its own problem, so only the aggregation prompt's fixed head
is found cached across runs, as on any warm server. Prints medians per mode and in-engine's
speedup over each outside mode (median of paired ratios); --json PATH writes every run.

    python -m zayaserve.bench.rsa [--n 8 --k 4 --t 2] [--outside-server both] [--repeats 3]
    python -m zayaserve.bench.rsa --problem-tokens 1500 --tail-tokens 16 \\
        --round-max-tokens 16 --final-max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from zayaserve.bench.local_services import UvicornServer

PROBLEM = ("A train leaves at 9:40 and arrives at 13:05, stopping twice for 7 minutes each. "
           "What is its average speed while moving over a 212 km route?")
TAGS = {"in-engine": "i", "outside-cached": "oc", "outside-uncached": "ou"}
TOWNS = ("Aston", "Brill", "Corfe", "Dunmow", "Eyam", "Frome", "Goole", "Hythe", "Ilkley")


@dataclass
class Run:
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # the engine's prefix-cache hit tokens during the run
    calls: int

    @property
    def completion_tps(self) -> float:
        return self.completion_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.completion_tokens) / self.seconds


def with_passage(problem: str, tokens: int, tag: str, count: Callable[[str], int]) -> str:
    """`problem` and the most numbered sentences of a passage (seeded by `tag`) that keep it
    within `tokens` tokens; `problem` itself when none fits (e.g. tokens=0)."""
    rng = random.Random(tag)
    lines = [f"{i}. Train {rng.randint(100, 999)} leaves {rng.choice(TOWNS)} at "
             f"{rng.randint(5, 22)}:{rng.randint(0, 59):02d} and runs {rng.randint(20, 400)} km "
             f"to {rng.choice(TOWNS)}." for i in range(1, tokens // 8 + 2)]

    def text(m: int) -> str:
        return problem + "\n\nTimetable notes:\n" + "\n".join(lines[:m]) if m else problem
    lo, hi = 0, len(lines)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(text(mid)) <= tokens else (lo, mid - 1)
    return text(lo)


class Bench:
    def __init__(self, args: argparse.Namespace, targets: dict[str, tuple[str, Any]]) -> None:
        from zayaserve.replicas.rsa.serving import think_end_ids

        self.a, self.targets = args, targets  # "cached"/"uncached" -> (url, AsyncLLMEngine)
        self.tok = targets["cached"][1].engine.tokenizer
        self.think_end = think_end_ids(self.tok)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def problem(self, rep: int, mode: str) -> str:
        tag = f"run {rep + 1} {TAGS[mode]}"  # the mode's own prefix (and passage)
        return with_passage(f"({tag}) {PROBLEM}", self.a.problem_tokens, tag, self.count)

    @staticmethod
    async def _hits(engine: Any) -> int:
        stats = await engine.run_on_engine(lambda e: e.stats())
        return int(stats["prefix_cache_local_hit_tokens"])

    @staticmethod
    async def _post(http: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await http.post(url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        out: dict[str, Any] = r.json()
        return out

    async def in_engine(self, http: Any, problem: str, seed: int) -> Run:
        a, (url, engine) = self.a, self.targets["cached"]
        rsa = {f: getattr(a, f) for f in ("n", "k", "t", "tail_tokens", "round_max_tokens",
                                          "final_max_tokens")} | {"seed": seed}
        body = {"model": a.name, "messages": [{"role": "user", "content": problem}], "rsa": rsa}
        hits = await self._hits(engine)
        t = time.perf_counter()
        out = await self._post(http, url, body)
        seconds, usage = time.perf_counter() - t, out["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        if cached != (hit := await self._hits(engine) - hits):  # counter and usage should agree
            print(f"  note: usage cached_tokens {cached}, engine hit tokens {hit}")
        return Run(seconds, usage["prompt_tokens"], usage["completion_tokens"], cached,
                   out["rsa"]["calls"])

    def _tail_text(self, text: str) -> str:
        """What the server's run carries of a trace (RSARun._tail_text), from its text."""
        from zayaserve.replicas.rsa.prompts import carry_tail

        tok, tail = self.tok, self.a.tail_tokens
        ids = tok.encode(text, add_special_tokens=False)
        cut = tok.decode(carry_tail(ids, self.think_end, "reasoning_tail", tail))
        while cut and (over := len(tok.encode(cut, add_special_tokens=False)) - tail) > 0:
            cut = cut[max(1, over):]
        return str(cut)

    async def outside(self, http: Any, problem: str, seed: int, server: str) -> Run:
        from zayaserve.replicas.rsa.prompts import aggregation_prompt
        from zayaserve.replicas.rsa.seeds import choose_subsets, derive_seed

        a, (url, engine) = self.a, self.targets[server]
        k = min(a.k, a.n)
        counts = [a.n] * a.t + [1] if a.t else [1]
        hits = await self._hits(engine)
        prompt = completion = 0
        previous: list[str] = []
        t = time.perf_counter()
        for r, count in enumerate(counts):
            final = r == len(counts) - 1
            if r == 0:
                messages = [problem] * count
            else:
                tails = [self._tail_text(text) for text in previous]
                messages = [aggregation_prompt(problem, [tails[i] for i in subset])
                            for subset in choose_subsets(seed, r, len(previous), k, count)]
            sampling: dict[str, Any] = (
                {"temperature": 0.6, "top_p": 0.95, "top_k": 40,
                 "max_tokens": a.final_max_tokens} if final else
                {"temperature": 1.0, "max_tokens": a.round_max_tokens})
            outs = await asyncio.gather(*(self._post(http, url, {
                "model": a.name, "messages": [{"role": "user", "content": m}],
                "seed": derive_seed(seed, r, i), **sampling}) for i, m in enumerate(messages)))
            prompt += sum(o["usage"]["prompt_tokens"] for o in outs)
            completion += sum(o["usage"]["completion_tokens"] for o in outs)
            previous = [o["choices"][0]["message"]["content"] or "" for o in outs]
        seconds = time.perf_counter() - t
        return Run(seconds, prompt, completion, await self._hits(engine) - hits, sum(counts))

    async def run(self, modes: list[str]) -> dict[str, list[Run]]:
        import httpx

        runs: dict[str, list[Run]] = {m: [] for m in modes}
        async with httpx.AsyncClient(timeout=3600) as http:
            for rep in range(-1, self.a.repeats):  # -1: the warm-up, discarded
                seed = self.a.seed + 1000 * (rep + 1)
                shift = max(rep, 0) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    problem = self.problem(rep, mode)
                    result = await (self.in_engine(http, problem, seed) if mode == "in-engine"
                                    else self.outside(http, problem, seed, mode.split("-")[1]))
                    print(f"{'warm-up' if rep < 0 else f'repeat {rep}'} {mode:>16}: "
                          f"{result.seconds:7.2f} s  {result.calls} calls  prompt "
                          f"{result.prompt_tokens}  completion {result.completion_tokens}  "
                          f"cached {result.cached_tokens}", flush=True)
                    if rep >= 0:
                        runs[mode].append(result)
        return runs


FIELDS = {"seconds": ("wall s", ".2f"), "completion_tps": ("compl tok/s", ".1f"),
          "total_tps": ("total tok/s", ".1f"), "prompt_tokens": ("prompt tok", ".0f"),
          "completion_tokens": ("compl tok", ".0f"), "cached_tokens": ("cached tok", ".0f")}


def report(runs: dict[str, list[Run]], regime: str, json_path: str | None) -> None:
    med = statistics.median
    medians = {mode: {f: med(getattr(r, f) for r in rs) for f in FIELDS}
               for mode, rs in runs.items()}
    print(f"\n{regime}\n{'mode':<16}" + "".join(f" {h:>11}" for h, _ in FIELDS.values()))
    for mode, m in medians.items():
        print(f"{mode:<16}" + "".join(f" {m[f]:>11{fmt}}" for f, (_, fmt) in FIELDS.items()))
    ratios: dict[str, dict[str, float]] = {}
    for mode in [m for m in runs if m != "in-engine"]:
        pairs = list(zip(runs["in-engine"], runs[mode], strict=True))
        wall = [b.seconds / a.seconds for a, b in pairs]
        r = ratios[mode] = {
            "wall": med(wall), "wall_min": min(wall), "wall_max": max(wall),
            "completion_tps": med(a.completion_tps / b.completion_tps for a, b in pairs),
            "total_tps": med(a.total_tps / b.total_tps for a, b in pairs)}
        print(f"speedup in-engine vs {mode} (median of {len(pairs)} paired repeats): wall "
              f"{r['wall']:.2f}x ({r['wall_min']:.2f}-{r['wall_max']:.2f}), completion tok/s "
              f"{r['completion_tps']:.2f}x, total tok/s {r['total_tps']:.2f}x")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"regime": regime, "medians": medians, "speedup": ratios,
                       "runs": {m: [asdict(r) for r in rs] for m, rs in runs.items()}}, f, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zayaserve.bench.rsa", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="checkpoint folder or preset name")
    for flag, default in (("--n", 8), ("--k", 4), ("--t", 2), ("--tail-tokens", 64),
                          ("--round-max-tokens", 64), ("--final-max-tokens", 64)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--problem-tokens", type=int, default=0,
                    help="pad the problem with a passage to about this many tokens (0: no pad)")
    ap.add_argument("--outside-server", choices=("cached", "uncached", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, help="default: what the arguments need")
    ap.add_argument("--num-kv-blocks", type=int, help="blocks of 16 tokens; default: enough")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="write the medians and speedups to this file")
    args = ap.parse_args(argv)
    args.name = "zaya-" + str(args.model).rstrip("/").rsplit("/", 1)[-1]
    # An aggregation call: the problem, the template (~200 tokens), K tails, its max tokens.
    need = (args.problem_tokens + 512 + args.k * (args.tail_tokens + 2)
            + max(args.round_max_tokens, args.final_max_tokens))
    args.max_model_len = args.max_model_len or max(2048, -(-need // 256) * 256)
    args.num_kv_blocks = args.num_kv_blocks or max(2048, (args.n + 1) * args.max_model_len // 16)

    from zayaserve.cluster.frontend.engine_client import LocalEngineClient
    from zayaserve.cluster.frontend.openai_api import build_openai_app
    from zayaserve.replicas.engine.async_engine import AsyncLLMEngine
    from zayaserve.replicas.engine.config import EngineConfig
    from zayaserve.replicas.engine.llm_engine import LLMEngine
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    engines: list[Any] = []
    servers: list[UvicornServer] = []
    targets: dict[str, tuple[str, Any]] = {}
    caching = {"cached": True} | ({} if args.outside_server == "cached" else {"uncached": False})
    modes = ["in-engine"] + [f"outside-{s}" for s in ("cached", "uncached")
                             if args.outside_server in (s, "both")]
    try:
        for name, cache in caching.items():
            engines.append(engine := AsyncLLMEngine(LLMEngine(EngineConfig.create(
                model=str(path), enable_prefix_caching=cache, max_model_len=args.max_model_len,
                block_size=16, num_kv_blocks=args.num_kv_blocks))))
            servers.append(UvicornServer(build_openai_app(LocalEngineClient(engine, args.name))))
            targets[name] = (servers[-1].url, engine)
        bench = Bench(args, targets)
        sample = bench.count(bench.problem(0, "in-engine"))
        regime = (f"regime: N={args.n} K={args.k} T={args.t} tail {args.tail_tokens}, max tokens "
                  f"{args.round_max_tokens}/{args.final_max_tokens}, problem {sample} tokens "
                  f"(--problem-tokens {args.problem_tokens})")
        print(f"{regime} | model {path} | outside server {args.outside_server} | max_model_len "
              f"{args.max_model_len}, {args.num_kv_blocks} kv blocks | threads {args.threads} | "
              f"{args.repeats} repeats after a warm-up", flush=True)
        report(asyncio.run(bench.run(modes)), regime, args.json)
    finally:
        for server in servers:
            server.stop()
        for engine in engines:
            engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
