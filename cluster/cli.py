"""The `zayaserve` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def _init_checkpoint(args: argparse.Namespace) -> int:
    from zayaserve.replicas.model.builtin.random_checkpoint import init_checkpoint

    out = init_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=args.dtype)
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from zayaserve import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, n=args.n, stop=args.stop or None,
        logprobs=args.logprobs)
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        for completion in out.outputs:
            if args.json:
                print(json.dumps({"index": completion.index, "text": completion.text,
                                  "token_ids": completion.token_ids,
                                  "finish_reason": completion.finish_reason}))
            else:
                print(completion.text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """The benchmarks sit above the command line in the floor plan (tests/test_import_floors.py):
    it runs them by name, as `python -m zayaserve.bench.<name>` would."""
    return int(importlib.import_module(f"zayaserve.bench.{args.which}").main(args.rest))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zayaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-checkpoint", help="write a random-weight ZAYA1 checkpoint")
    p.add_argument("out")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "zaya1-8b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_init_checkpoint)

    p = sub.add_parser("generate", help="generate offline from a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", required=True, help="checkpoint folder, or 'tiny' / 'small'")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto", help="auto (GPU if torch sees one), cpu, cuda")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--stop", action="append")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per completion")
    p.set_defaults(func=_generate)

    from zayaserve.cluster.serve_cli import add_serve_parser

    add_serve_parser(sub)

    from zayaserve.cluster.scale_cli import add_scale_parser

    add_scale_parser(sub)

    p = sub.add_parser("bench", help="run a benchmark (see bench/)")
    p.add_argument("which", choices=["throughput", "serve", "rsa"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:  # bad input: name it, exit 2
        print(f"zayaserve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before `serve` took over SIGINT: no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
