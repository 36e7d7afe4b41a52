"""Offline throughput: zayaserve's continuous batching vs transformers' `generate`.

Same seeded workload for both (default: 64 requests, prompts 16-512 tokens, outputs 16-128
tokens, the `small` preset), same torch threads, one process. transformers runs static batches
of 16 with left padding, each batch decoding until its longest request is done; both count only
the tokens each request asked for. Also prints a roofline estimate for zayaserve's decode steps:
the bytes a decode step must read (weights it touches + KV) over measured memory bandwidth.

    python -m zayaserve.bench.throughput [--requests 64] [--skip-hf]
    zayaserve bench throughput
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, vocab: int, seed: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int]) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))]
               for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Measured copy bandwidth (read + write) of this machine, GB/s."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def run_zayaserve(path: Path, work: Workload, args: argparse.Namespace) -> tuple[float, dict]:
    from zayaserve import LLM, SamplingParams

    llm = LLM(model=str(path), max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=16)
    runner = llm.engine.runner
    decode_times: list[tuple[float, int, int]] = []  # (seconds, batch size, context tokens)
    execute = runner.execute

    def timed_execute(step, rows, fill=None):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        logits = execute(step, rows, fill)
        if all(c.num_tokens == 1 for c in step.chunks):  # a pure decode step
            decode_times.append((time.perf_counter() - t, len(step.chunks),
                                 sum(c.start + 1 for c in step.chunks)))
        return logits

    runner.execute = timed_execute  # type: ignore[method-assign]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in work.output_lens]
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)
    elapsed = time.perf_counter() - t
    assert [len(o.outputs[0].token_ids) for o in outs] == work.output_lens
    return elapsed, {"decode_steps": decode_times, "llm": llm}


def run_transformers(path: Path, work: Workload, batch: int) -> float:
    from transformers import ZayaForCausalLM

    from zayaserve.replicas.model.builtin.random_checkpoint import restore_hf_balancing_biases_

    model = ZayaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # transformers 5.23 resets the skip-class balancing bias on load; same model for both.
    restore_hf_balancing_biases_(model, path)
    pad = model.config.pad_token_id or 0
    t = time.perf_counter()
    for start in range(0, len(work.prompts), batch):
        prompts = work.prompts[start:start + batch]
        new = max(work.output_lens[start:start + batch])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t


def roofline(llm: object, decode_steps: list[tuple[float, int, int]], bw: float) -> str:
    """Bytes a decode step must touch: attention-side weights, the experts its tokens hit
    (at most min(batch, E) per layer) and the K/V it attends over."""
    engine = llm.engine  # type: ignore[attr-defined]
    cfg = engine.model_config
    elem = torch.tensor([], dtype=engine.model.dtype).element_size()
    attn_bytes = sum(p.numel() for n, p in engine.model.named_parameters()
                     if n != "lm_head.weight" or not cfg.tie_word_embeddings) * elem
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * elem
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.kv_size * elem
    if not decode_steps:
        return "no pure decode steps observed"
    secs = sum(d[0] for d in decode_steps)
    need = sum(attn_bytes + cfg.num_hidden_layers * min(b, cfg.num_experts) * expert_bytes
               + ctx * kv_per_token for _, b, ctx in decode_steps)
    ideal = need / (bw * 1e9)
    mean_b = sum(d[1] for d in decode_steps) / len(decode_steps)
    return (f"decode steps: {len(decode_steps)} (mean batch {mean_b:.1f}), "
            f"{need / len(decode_steps) / 1e6:.1f} MB read per step, measured "
            f"{secs / len(decode_steps) * 1e3:.2f} ms/step vs bandwidth bound "
            f"{ideal / len(decode_steps) * 1e3:.2f} ms/step -> {ideal / secs:.1%} of roofline")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zayaserve bench throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="checkpoint folder or preset name")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true", help="zayaserve only")
    args = ap.parse_args(argv)

    from zayaserve.replicas.model.checkpoint_paths import resolve_model
    from zayaserve.replicas.model.config import ZayaConfig

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    cfg = ZayaConfig.from_pretrained(path)
    work = make_workload(args.requests, cfg.vocab_size, args.seed, tuple(args.prompt_len),
                         tuple(args.output_len))
    prompt_tokens = sum(len(p) for p in work.prompts)
    print(f"model {path} | {args.requests} requests, {prompt_tokens} prompt tokens, "
          f"{work.output_tokens} output tokens | threads {args.threads}")
    bw = memory_bandwidth_gbs()
    print(f"measured memory bandwidth: {bw:.1f} GB/s")

    zs, info = run_zayaserve(path, work, args)
    zs_tps = work.output_tokens / zs
    print(f"zayaserve:    {zs:7.2f} s  {zs_tps:8.1f} output tok/s  "
          f"{(work.output_tokens + prompt_tokens) / zs:8.1f} total tok/s")
    print("roofline:", roofline(info["llm"], info["decode_steps"], bw))
    if not args.skip_hf:
        hf = run_transformers(path, work, args.hf_batch)
        hf_tps = work.output_tokens / hf
        print(f"transformers: {hf:7.2f} s  {hf_tps:8.1f} output tok/s  "
              f"{(work.output_tokens + prompt_tokens) / hf:8.1f} total tok/s "
              f"(static batches of {args.hf_batch})")
        print(f"ratio zayaserve / transformers: {zs_tps / hf_tps:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
