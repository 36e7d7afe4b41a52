"""Structured outputs' cost: decode tokens/s at batch 32 with a JSON-schema constraint (the
xgrammar mask filled per row each step and applied in the sampler) against the same batch
without one, in the same process.

Both runs decode exactly `--gen-len` tokens per sequence: the unconstrained run ignores EOS,
and each schema keeps its JSON open past `--gen-len` tokens (a long string, or a long list of
small objects), so the runs differ only in the constraint. Two schemas: "string" (masks that
allow most of the vocabulary) and "objects" (keys, integers, booleans: masks that change
every few tokens). The ratio is constrained / unconstrained decode tokens/s (target >= 0.8).

The constrained runs decode other tokens than the free one, and with random weights the
tokens decide which experts run, so the end-to-end ratio also moves with routing. So the run
also (1) times the mask work itself (filling each row's bitmask, applying it to the logits),
per step and as a share of the constrained run's wall time, and (2) runs a permissive
constraint, a regex matching any text: with the same seeds it draws (nearly) the free run's tokens
(the share printed), so its ratio is the mask's whole cost with routing held equal.

    python -m zayaserve.bench.structured [--model small] [--batch 32] [--gen-len 64]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.engine.structured import StructuredOutputsParams
from zayaserve.replicas.llm import LLM
from zayaserve.replicas.model.checkpoint_paths import resolve_model

SCHEMAS: dict[str, dict[str, Any]] = {
    "string": {"type": "object", "properties": {"answer": {"type": "string",
                                                           "minLength": 4000}},
               "required": ["answer"]},
    "objects": {"type": "array", "minItems": 500, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"},
                                         "tag": {"enum": ["alpha", "beta", "gamma"]}},
        "required": ["id", "ok", "tag"], "additionalProperties": False}},
}


def _prompts(batch: int) -> list[str]:
    return [f"Request {i}: list the results as JSON." for i in range(batch)]


class MaskTimer:
    """Accumulates the time spent building and applying grammar masks."""

    def __init__(self, llm: LLM) -> None:
        self.seconds, self.steps = 0.0, 0
        grammars = llm.engine.grammars
        step_mask = grammars.step_mask

        def timed_step_mask(matchers: Any) -> Any:
            start = time.perf_counter()
            mask = step_mask(matchers)
            self.seconds += time.perf_counter() - start
            if mask is not None:
                self.steps += 1
                apply = mask.apply

                def timed_apply(logits: Any) -> None:
                    t0 = time.perf_counter()
                    apply(logits)
                    self.seconds += time.perf_counter() - t0
                mask.apply = timed_apply  # type: ignore[method-assign]
            return mask

        grammars.step_mask = timed_step_mask  # type: ignore[method-assign]

    def reset(self) -> None:
        self.seconds, self.steps = 0.0, 0


def _run(llm: LLM, batch: int, gen_len: int, spec: StructuredOutputsParams | None
         ) -> tuple[float, list[tuple[int, ...]]]:
    # min_tokens bans EOS in every run alike (the grammars would allow it once complete).
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=gen_len, min_tokens=gen_len,
                            structured_outputs=spec)
    start = time.perf_counter()
    outs = llm.generate(_prompts(batch), params)
    elapsed = time.perf_counter() - start
    ids = [tuple(o.outputs[0].token_ids) for o in outs]
    if sum(map(len, ids)) != batch * gen_len:
        raise RuntimeError(f"expected {batch * gen_len} tokens, got {sum(map(len, ids))}: a "
                           "schema closed early; lengthen it")
    return elapsed, ids


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="a preset name or checkpoint path")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each")
    args = ap.parse_args(argv)
    llm = LLM(model=str(resolve_model(args.model)), max_num_seqs=args.batch)
    specs = {name: StructuredOutputsParams(json=schema)  # type: ignore[arg-type]
             for name, schema in SCHEMAS.items()}
    specs["any"] = StructuredOutputsParams(regex=r"[\s\S]*")
    for spec in [None, *specs.values()]:  # warm-up: compile, first-touch allocations
        _run(llm, args.batch, 8, spec)
    timer = MaskTimer(llm)
    best: dict[str, float] = {}
    mask_ms: dict[str, float] = {}
    mask_share: dict[str, float] = {}
    ids: dict[str, list[tuple[int, ...]]] = {}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
        for name, spec in [("none", None), *specs.items()]:
            timer.reset()
            elapsed, ids[name] = _run(llm, args.batch, args.gen_len, spec)
            tokens = args.batch * args.gen_len
            if tokens / elapsed > best.get(name, 0.0):
                best[name] = tokens / elapsed
                if spec is not None:
                    mask_ms[name] = 1e3 * timer.seconds / max(timer.steps, 1)
                    mask_share[name] = timer.seconds / elapsed
    result = {"model": args.model, "batch": args.batch, "gen_len": args.gen_len,
              "tok_s": best, "ratio": {n: best[n] / best["none"] for n in specs},
              "mask_ms_per_step": mask_ms, "mask_share_of_wall": mask_share,
              "any_same_tokens": sum(a == b for a, b in zip(ids["any"], ids["none"],
                                                            strict=True)) / args.batch}
    print(f"batch {args.batch}, {args.gen_len} tokens per sequence, model {args.model}")
    print(f"  unconstrained        {best['none']:8.1f} tok/s")
    for name in specs:
        label = f"json schema {name}" if name in SCHEMAS else f"regex {name}"
        print(f"  {label:20s} {best[name]:8.1f} tok/s  "
              f"ratio {result['ratio'][name]:.2f}x  mask {mask_ms[name]:.2f} ms/step "
              f"({100 * mask_share[name]:.1f}% of wall)")
    print(f"  (`any` drew the free run's tokens in {100 * result['any_same_tokens']:.0f}% "
          "of the sequences)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
