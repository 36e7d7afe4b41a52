"""The engine: requests in, one step = schedule -> run -> update, `StepDelta`s out."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import torch

from zayaserve.replicas.engine.block_pool import BlockPool, StateSlots
from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.decode_graphs import CudaGraphCapture, DecodeGraphs, GraphCapture
from zayaserve.replicas.engine.device import dtype_for, resolve_device
from zayaserve.replicas.engine.engine_stats import EngineStats, engine_stats
from zayaserve.replicas.engine.grammar import Grammars, no_compiles
from zayaserve.replicas.engine.grammar_compile import CompiledGrammar
from zayaserve.replicas.engine.kv_layout import kv_layout
from zayaserve.replicas.engine.latency_window import LatencyPercentiles, LatencyWindow
from zayaserve.replicas.engine.output_processor import OutputProcessor, TokenRecord
from zayaserve.replicas.engine.output_thread import OutputThread
from zayaserve.replicas.engine.outputs import StepDelta
from zayaserve.replicas.engine.params import ParamError, SamplingParams
from zayaserve.replicas.engine.request_limits import check_prompt, check_request
from zayaserve.replicas.engine.request_timeline import RequestTimeline
from zayaserve.replicas.engine.resume import Resume, check_resume
from zayaserve.replicas.engine.runner import ModelRunner
from zayaserve.replicas.engine.scheduler import Scheduler, SchedulerConfig
from zayaserve.replicas.engine.sequence import Request, Sequence, Status
from zayaserve.replicas.engine.step_pipeline import StepPipeline
from zayaserve.replicas.engine.step_sampling import StepSampler, plan_logits
from zayaserve.replicas.kv_tiers.hashing import (
    BlockHasher,
    cache_namespace,
    model_fingerprint,
    weights_identity_of,
)
from zayaserve.replicas.kv_tiers.redis_store import RedisBlockStore
from zayaserve.replicas.kv_tiers.remote_tier import RemoteTier, cache_secret
from zayaserve.replicas.model.experts import ExpertBackend, LocalExpertBackend
from zayaserve.replicas.model.kv_cache import KVCache
from zayaserve.replicas.model.loader import load_attention_side, load_expert_side
from zayaserve.replicas.model.tokenizer import Tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig, experts: ExpertBackend | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = Path(config.model)
        self.device = device = resolve_device(config.device)
        self.model = load_attention_side(config.model, dtype_for(config.dtype, device), device)
        self.model_config = mc = self.model.config
        self.experts = experts if experts is not None else LocalExpertBackend(
            load_expert_side(config.model, None, self.model.dtype, device), mc.num_experts)
        self.tokenizer = Tokenizer.from_pretrained(path) if (
            path / "tokenizer.json").is_file() else None
        self.eos_ids = (self.tokenizer.eos_token_ids if self.tokenizer else mc.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, mc.vocab_size, self.eos_ids, config.limits)

        bs = config.block_size
        self.max_model_len, num_blocks = kv_layout(config, mc, self.model.dtype)
        self.cache = KVCache(mc, num_blocks, bs, config.max_num_seqs, self.model.dtype,
                             device=device, snapshots=config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, bs,
                            config.enable_prefix_caching, tuple(self.eos_ids),
                            self.max_model_len),
            BlockPool(num_blocks), StateSlots(config.max_num_seqs))
        self.scheduler.spawn = self._new_sequence
        self.scheduler.kv.copy_state = self.cache.copy_state
        # Block hashes are namespaced by the model (config + weights identity), block size and
        # encoding, so no two models or layouts can ever share an entry.
        self.fingerprint = model_fingerprint(
            {**mc.model_dump(mode="json"), "cache_dtype": str(self.model.dtype)},
            weights_identity_of(config.model, device))
        self.cache_namespace = cache_namespace(self.fingerprint, bs, config.kv_cache_encoding)
        self.remote = self._remote_tier() if config.kv_cache_redis_url else None
        self.scheduler.kv.remote = self.remote
        self.latency = LatencyWindow()  # recent TTFTs and ITLs (latency_percentiles)
        self.runner = ModelRunner(self.model, self.experts, self.cache, config.micro_batches,
                                  self.decode_graphs())
        self.sampler = StepSampler(self.grammars, self.eos_ids, config.seed)
        self.pipeline = StepPipeline(self.scheduler, self.runner, self.sampler,
                                     config.async_scheduling)
        self.outputs = OutputProcessor(self.tokenizer)
        self.output_thread = OutputThread(self.outputs) if config.output_thread else None
        self.requests: dict[str, Request] = {}
        # Constrained requests' compiled grammars, held to their end: matchers come from them.
        self.request_grammars: dict[str, CompiledGrammar] = {}
        # The requests the current/last step scheduled (None while scheduling): if a step
        # fails, these are the ones whose state it may have left half-written.
        self.last_step_request_ids: set[str] | None = set()
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()

    def decode_graphs(self, capture: GraphCapture | None = None,
                      whole_step: bool | None = None) -> DecodeGraphs | None:
        """Graphs for decode steps: on a GPU unless enforce_eager (or with a given capture);
        `whole_step`: one graph per step (default: when the experts can be in it)."""
        if capture is None:
            if self.config.enforce_eager or self.device.type != "cuda":
                return None
            capture = CudaGraphCapture(self.device)
        longest = min(self.max_model_len, self.config.max_seq_len_to_capture)
        width = -(-longest // self.config.block_size)
        return DecodeGraphs(self.model, self.experts, self.cache,
                            min(self.config.max_num_seqs, 512), width, capture,
                            whole_step=whole_step)

    def _remote_tier(self) -> RemoteTier:
        c = self.config
        if not c.enable_prefix_caching:
            raise ValueError("kv_cache_redis_url: needs enable_prefix_caching=True")
        secret = cache_secret(c.kv_cache_secret.get_secret_value() if c.kv_cache_secret else None)
        return RemoteTier(RedisBlockStore(c.kv_cache_redis_url or "", ttl_s=c.kv_cache_ttl_s),
                          self.cache, self.model_config, self.fingerprint, secret,
                          c.kv_cache_encoding)

    def stats(self) -> dict[str, float]:
        """Flat numeric stats: the offline `LLM.stats()`."""
        return self.engine_stats().as_dict()

    def engine_stats(self) -> EngineStats:
        """The same, typed: what an attention worker reports in serving."""
        return engine_stats(self.scheduler, self.remote)

    def latency_percentiles(self) -> LatencyPercentiles:
        """Recent p90 TTFT and inter-token latency (for the autoscaler)."""
        return self.latency.percentiles()

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        trace_context: Mapping[str, str] | None = None,
        grammar: CompiledGrammar | None = None,
        resume: Resume | None = None,
    ) -> None:
        """`trace_context`: the caller's W3C headers; a sampled one gets an engine span.
        `grammar`: the constraint compiled by the caller, else it is compiled here. `resume`:
        the request continues from what its client already has (`resume`)."""
        if request_id in self.requests:
            raise ParamError("request_id", f"request_id: {request_id!r} is already in flight")
        check_prompt(prompt_token_ids, self.model_config.vocab_size)
        check_request(params, self.config.limits, self.model_config.vocab_size, self.eos_ids,
                      has_tokenizer=self.tokenizer is not None)
        grammar = self.grammars.held(params.structured_outputs, grammar)
        if len(prompt_token_ids) >= self.max_model_len:
            raise ParamError("prompt", f"prompt: {len(prompt_token_ids)} tokens leave no room to "
                             f"generate within max_model_len {self.max_model_len}")
        done: tuple[int, ...] = ()
        if resume is not None:  # its prompt logprobs were sent; its latency is not this one's
            check_resume(resume, params, len(prompt_token_ids), self.model_config.vocab_size,
                         self.max_model_len)
            done = resume.output_token_ids
        wants_prompt_logprobs = params.prompt_logprobs is not None and resume is None
        req = Request(request_id, prompt, list(prompt_token_ids), params, next(self._arrivals),
                      prompt_logprobs=[None] if wants_prompt_logprobs else None,
                      timeline=RequestTimeline.begin(request_id, len(prompt_token_ids), params,
                                                     trace_context,
                                                     self.latency if resume is None else None))
        if grammar is not None:
            self.request_grammars[request_id] = grammar
        seq = self._new_sequence(req, 0, [*prompt_token_ids, *done])
        seq.forks_pending = params.n - 1
        if resume is not None:
            seq.cumulative_logprob = resume.cumulative_logprob
            self.outputs.resume(seq, resume)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def _new_sequence(self, req: Request, index: int, tokens: list[int]) -> Sequence:
        p = req.params
        seq = Sequence(next(self._seq_ids), req, index, tokens,
                       self.sampler.seed_for(p.child_seed(index)),
                       logprobs=[] if p.logprobs is not None else None)
        seq.grammar = self.grammars.matcher(
            p.structured_outputs, self.request_grammars.get(req.request_id),
            tokens[seq.prompt_len:], p.stop_token_ids or ())
        if self.config.enable_prefix_caching:
            namespace = self.cache_namespace if p.cache_salt is None else cache_namespace(
                self.fingerprint, self.config.block_size, self.config.kv_cache_encoding,
                p.cache_salt)  # salted prefixes are shared only within the salt
            seq.start_hashing(BlockHasher(namespace, self.config.block_size))
        req.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        if self.output_thread is not None:  # outputs made before the abort are not sent
            self.output_thread.join()
            self.output_thread.discard(request_id)
        req = self.requests.pop(request_id, None)
        self.request_grammars.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        req.timeline.finish([s.num_output_tokens for s in req.seqs],
                            [s.finish_reason or "" for s in req.seqs])  # ends its span

    def has_unfinished_requests(self) -> bool:
        """Requests in the engine, or outputs of theirs the output thread still owes."""
        return bool(self.requests) or (
            self.output_thread is not None and self.output_thread.pending)

    def _retire(self, req: Request) -> None:
        """Forgets a request all of whose sequences have finished."""
        if req.finished and self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
            self.request_grammars.pop(req.request_id, None)

    def _apply_stops(self) -> None:
        """Finishes the sequences the output processor found a stop string in (their later
        tokens, already computed, it drops)."""
        stops = self.outputs.stops
        while stops:
            seq, stop = stops.popleft()
            if seq.status is not Status.FINISHED:
                seq.finish_reason, seq.stop_reason = "stop", stop
                self.scheduler.finish(seq)
                self._retire(seq.request)

    # ---- the step -------------------------------------------------------------------------

    @no_compiles()  # a compile here would stall every running request: it raises
    def step(self) -> list[StepDelta]:
        """schedule -> run -> update, then the output processor: StepDeltas for the requests
        that got tokens. With async scheduling the step after this one may be launched before
        this one's tokens arrive (see step_pipeline); with the output thread the deltas are
        made there, and a step returns those ready (see output_thread)."""
        self._apply_stops()
        records = self._run_step()
        thread = self.output_thread
        if thread is None:
            deltas = self.outputs.process(records)
            self._apply_stops()
            return deltas
        if records:
            thread.submit(records)
        if not self.requests:
            thread.join()  # nothing left to run: wait for the last outputs
        deltas, failure = thread.take()
        if failure is not None:
            self.last_step_request_ids = failure.request_ids
            raise failure.error
        return deltas

    def _run_step(self) -> list[TokenRecord]:
        self.last_step_request_ids = None
        pipeline = self.pipeline
        current = pipeline.take_ahead()
        if current is None:
            sched = self.scheduler.schedule()
            if not sched.chunks:
                self.last_step_request_ids = set()
                if self.scheduler.fetching:  # only L2 fetches in flight: wait, not spin
                    wait([s.remote_fetch[1] for s in self.scheduler.fetching], timeout=0.005,
                         return_when=FIRST_COMPLETED)
                return []
            current = pipeline.launch(sched, plan_logits(sched))
        pipeline.launch_ahead(current)
        self.last_step_request_ids = current.request_ids | (
            pipeline.ahead.request_ids if pipeline.ahead is not None else set())
        try:
            sampled = current.result.result()
        except BaseException:
            pipeline.drain()  # the step after it fails with it
            raise
        records = self.scheduler.update_from_output(current.sched, sampled)
        for rec in records:
            if rec.finish_reason is not None:
                self._retire(rec.seq.request)
        return records
