"""Run by test_kernels_engine.py in a fresh process (TRITON_INTERPRET=1 and
ZAYASERVE_KERNELS=triton set before anything imports triton): the whole engine on the
Triton kernels against transformers' ZayaForCausalLM, eagerly and with decode graphs (re-run
segments over static buffers, as on a GPU without the driver). Prints one JSON line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hf_reference import build_hf_checkpoint, reference_greedy, reference_prompt_logprobs

from zayaserve import LLM, SamplingParams
from zayaserve.kernels.registry import default_kernels
from zayaserve.replicas.engine.decode_graphs import RerunCapture

path = Path(sys.argv[1])
model = build_hf_checkpoint(path, seed=3, num_hidden_layers=2,
                            layer_types=["hybrid", "hybrid_sliding"], sliding_window=5)
prompts = [[7, 30, 99, 150, 201, 12, 45, 88, 300], [11, 250, 64]]
steps = 8
refs = [(reference_prompt_logprobs(model, p), reference_greedy(model, p, steps)) for p in prompts]
llm = LLM(model=str(path), block_size=4, max_num_batched_tokens=6)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True,
                                   prompt_logprobs=0))
worst = 0.0
same = True
for p, out, (ref_lp, ref_tokens) in zip(prompts, outs, refs, strict=True):
    got = torch.tensor([out.prompt_logprobs[i][t].logprob for i, t in enumerate(p) if i > 0])
    worst = max(worst, float((got - ref_lp).abs().max()))
    same &= out.outputs[0].token_ids == ref_tokens
graphs = LLM(model=str(path), block_size=4, max_num_batched_tokens=6)
graphs.engine.runner.graphs = graphs.engine.decode_graphs(RerunCapture())
graph_outs = graphs.generate([{"prompt_token_ids": p} for p in prompts],
                             SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
graphs_same = all(o.outputs[0].token_ids == ref for o, (_, ref) in zip(graph_outs, refs,
                                                                      strict=True))
print(json.dumps({"kernels": default_kernels(), "max_logprob_err": worst,
                  "greedy_equal": same, "graphs_greedy_equal": graphs_same,
                  "graph_buckets": sorted(graphs.engine.runner.graphs._graphs)}))
