"""`echo` + `logprobs` + `max_tokens: 0` on /v1/completions, through the real `openai` client:
the prompt tokens' logprobs are exactly the offline LLM's `prompt_logprobs`, and transformers'
within 1e-4 (fp32); echo with generation and streamed echo give the same text and logprobs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from hf_reference import build_hf_checkpoint, reference_prompt_logprobs
from openai_helpers import MODEL, Server, make_engine_client

from zayaserve import LLM, SamplingParams
from zayaserve.cluster.frontend.openai_api import build_openai_app
from zayaserve.replicas.model.checkpoint_paths import resolve_model

PROMPT_IDS = [2, 40, 17, 300, 5, 77, 123, 9, 450, 31, 64, 200]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any, str]]:
    """A transformers-built checkpoint (with the tiny tokenizer) served over REST."""
    path = tmp_path_factory.mktemp("echo")
    model = build_hf_checkpoint(path, seed=4, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model("tiny") / name, path / name)
    engine_client = make_engine_client(str(path))
    server = Server(build_openai_app(engine_client))
    yield path, model, server.url
    server.stop()
    engine_client.engine.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def test_scoring_a_prompt_matches_offline_and_transformers(served: Any) -> None:
    path, hf_model, url = served
    out = _client(url).completions.create(model=MODEL, prompt=PROMPT_IDS, echo=True,
                                          logprobs=2, max_tokens=0)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage is not None
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(PROMPT_IDS)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert len(lp.tokens) == len(PROMPT_IDS) and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text  # the prompt, and nothing generated
    served_lp = torch.tensor(lp.token_logprobs[1:], dtype=torch.float64)
    offline = LLM(model=str(path)).generate(
        [{"prompt_token_ids": PROMPT_IDS}],
        SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs
    assert offline is not None
    want = torch.tensor([offline[i][t].logprob for i, t in enumerate(PROMPT_IDS) if i > 0],
                        dtype=torch.float64)
    assert torch.equal(served_lp, want)  # exactly the engine's prompt_logprobs
    reference = reference_prompt_logprobs(hf_model, PROMPT_IDS).double()
    assert (served_lp - reference).abs().max().item() < 1e-4
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])  # type: ignore[arg-type]


def test_echo_with_generation_and_streamed(served: Any) -> None:
    _, _, url = served
    client = _client(url)
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT_IDS, echo=True, logprobs=1,
                              max_tokens=4, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    plain = client.completions.create(**{**kw, "echo": False}).choices[0]
    prompt_text = "".join(whole.logprobs.tokens[:len(PROMPT_IDS)])  # type: ignore[union-attr]
    assert whole.text == prompt_text + plain.text
    assert len(whole.logprobs.tokens) == len(PROMPT_IDS) + 4  # type: ignore[union-attr]
    offsets = whole.logprobs.text_offset  # type: ignore[union-attr]
    assert offsets == sorted(offsets) and offsets[len(PROMPT_IDS)] == len(prompt_text)
    for scoring in (False, True):
        args = {**kw, "max_tokens": 0} if scoring else kw
        full = client.completions.create(**args).choices[0]
        chunks = list(client.completions.create(**args, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
                  for t in c.choices[0].logprobs.tokens]
        assert text == full.text and tokens == full.logprobs.tokens  # type: ignore[union-attr]
        assert chunks[-1].choices[0].finish_reason == "length"


def test_max_tokens_zero_needs_echo(served: Any) -> None:
    _, _, url = served
    with pytest.raises(openai.BadRequestError, match="max_tokens: .*echo"):
        _client(url).completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=0)
