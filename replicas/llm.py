"""vLLM-style offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from zayaserve.replicas.engine.config import EngineConfig
from zayaserve.replicas.engine.llm_engine import LLMEngine
from zayaserve.replicas.engine.outputs import RequestOutput, RequestOutputBuilder
from zayaserve.replicas.engine.params import SamplingParams
from zayaserve.replicas.rsa.params import RSAParams
from zayaserve.replicas.rsa.rounds import RSAResult

PromptInput = str | dict[str, Any]


class LLM:
    """Generates with a ZAYA1 checkpoint in this process (experts local)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        from zayaserve.replicas.model.checkpoint_paths import resolve_model

        name = str(model)
        if not name.startswith("random:"):  # random:<preset> weights are made on the device
            name = str(resolve_model(model))
        self.engine_config = EngineConfig.create(model=name, **kwargs)
        self.engine = LLMEngine(self.engine_config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _encode(self, prompt: PromptInput, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise ValueError("prompt: this checkpoint has no tokenizer; pass "
                                 "{'prompt_token_ids': [...]} instead of text")
            return prompt, tok.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError(f"prompts[{index}].prompt_token_ids: must be a list of ints")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._encode(prompt["prompt"], index)
        raise ValueError(f"prompts[{index}]: expected a string or a dict with 'prompt_token_ids' "
                         f"or 'prompt', got {type(prompt).__name__}")

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        single = isinstance(prompts, str | dict)
        prompt_list: list[PromptInput] = [prompts] if single else list(prompts)  # type: ignore
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompt_list)
        else:
            params = list(sampling_params)
            if len(params) != len(prompt_list):
                raise ValueError(f"sampling_params: {len(params)} given for "
                                 f"{len(prompt_list)} prompts")
            for i, sp in enumerate(params):
                if not isinstance(sp, SamplingParams):
                    raise ValueError(f"sampling_params[{i}]: expected SamplingParams, "
                                     f"got {type(sp).__name__}")
        # Validate everything before anything is queued, so a bad prompt loses nothing.
        encoded = [self._encode(p, i) for i, p in enumerate(prompt_list)]
        order: dict[str, int] = {}
        builders: dict[str, RequestOutputBuilder] = {}
        try:
            for i, ((text, ids), sp) in enumerate(zip(encoded, params, strict=True)):
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, sp, prompt=text)
                order[rid] = i
                builders[rid] = RequestOutputBuilder(rid, text)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return self._run(order, builders)

    def _run(self, order: dict[str, int], builders: dict[str, RequestOutputBuilder]
             ) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                out = builders[delta.request_id].add(delta)
                if out.finished:
                    results[order[delta.request_id]] = out
        return [r for r in results if r is not None]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """vLLM's `LLM.chat`; `tools` (OpenAI function definitions) go to the template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("messages: this checkpoint has no tokenizer/chat template")
        conversations: list[list[dict[str, Any]]] = (
            [messages] if messages and isinstance(messages[0], dict)  # type: ignore[list-item]
            else messages)  # type: ignore[assignment]
        prompts: list[PromptInput] = []
        for conv in conversations:
            # The messages' text is data: special-token strings in it stay plain text.
            text, ids = tok.render_chat(conv, add_generation_prompt=add_generation_prompt,
                                        tools=tools)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params)

    def rsa(self, problem: str | list[dict[str, Any]], params: RSAParams | None = None,
            **fields: Any) -> RSAResult:
        """A Markovian RSA run: `problem` is a conversation ending with the problem as a user
        message (rendered with the chat template) or a plain prompt; `params` (or its fields
        as keywords) as `RSAParams`. Returns the final round's outputs (`answers`), per-round
        figures (`rounds`) and, with return_population, every round's texts."""
        from zayaserve.replicas.rsa.events import RSAJob
        from zayaserve.replicas.rsa.offline import run_offline
        from zayaserve.replicas.rsa.serving import preflight, rsa_limits

        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("problem: RSA needs a checkpoint with a tokenizer")
        if params is not None and fields:
            raise ValueError("params: give RSAParams or its fields as keywords, not both")
        p = params if params is not None else RSAParams.model_validate(fields)
        request_id = f"rsa-{next(self._ids)}"
        if isinstance(problem, str):
            job = RSAJob(request_id, problem, problem, tok.encode(problem), p, chat=False)
        else:
            if not problem or problem[-1].get("role") != "user":
                raise ValueError("problem: a conversation must end with the problem, a user "
                                 "message")
            text, ids = tok.render_chat(problem, add_generation_prompt=True)
            job = RSAJob(request_id, str(problem[-1].get("content", "")), text, ids, p,
                         history=list(problem[:-1]))
        preflight(tok, job, rsa_limits(self.engine_config.limits), self.engine.max_model_len)
        return run_offline(self.engine, tok, job)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()
