"""Steady streaming load for the chaos benchmark, checked token for token.

Each client thread sends the same streaming completion again and again: half of them greedy,
half seeded sampling (each its own seed), every answer compared with the text the offline
engine gives for the same prompt and parameters (`truths`). Each request's fate is recorded:
finished exact, finished with changed text, or failed (by cause: the HTTP status and error
type, an in-band error event, or the connection's). Every text chunk's arrival is timed, so
throughput is known for each moment (`rate`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

REFUSED = "refused"  # the connection was refused: the request never reached a server
PROMPTS = ["The capital of", "Once upon a time", "zayaserve streams tokens", "1 2 3 4"]


def request_body(i: int, max_tokens: int) -> dict[str, Any]:
    """Client `i`'s request: greedy for even i, seeded sampling (seed 100 + i) for odd."""
    body: dict[str, Any] = {"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)],
                            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    if i % 2:
        body.update(temperature=1.0, top_p=0.95, seed=100 + i)
    else:
        body.update(temperature=0)
    return body


def truths(n: int, max_tokens: int) -> list[str]:
    """The offline engine's text for each client's request (the uninterrupted run's)."""
    from zayaserve import LLM, SamplingParams
    from zayaserve.replicas.model.checkpoint_paths import resolve_model

    llm = LLM(model=str(resolve_model("tiny")), output_thread=False)
    texts = []
    for i in range(n):
        b = request_body(i, max_tokens)
        params = SamplingParams(temperature=b["temperature"], top_p=b.get("top_p", 1.0),
                                seed=b.get("seed"), max_tokens=max_tokens, ignore_eos=True)
        texts.append(llm.generate([b["prompt"]], params)[0].outputs[0].text)
    return texts


@dataclass
class Outcome:
    client: int
    start: float
    end: float
    cause: str | None  # None: finished
    exact: bool = False


@dataclass
class Load:
    base: str
    want: list[str]
    max_tokens: int
    outcomes: list[Outcome] = field(default_factory=list)
    chunks: list[float] = field(default_factory=list)  # arrival times of text chunks
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(len(self.want))]
        for t in self.threads:
            t.start()
        return self

    def finish(self, timeout: float = 300) -> None:
        """Stops sending new requests; waits for those in flight."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout=timeout)

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(120, connect=10)) as http:
            while not self.stop.is_set():
                self.outcomes.append(self._one(http, i))

    def _one(self, http: httpx.Client, i: int) -> Outcome:
        start, text = time.monotonic(), []
        body = request_body(i, self.max_tokens)
        try:
            with http.stream("POST", self.base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    return Outcome(i, start, time.monotonic(), f"{r.status_code} "
                                   f"{_error_type(r.text)}")
                done = False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Outcome(i, start, time.monotonic(),
                                       f"in-band {event['error'].get('type')}")
                    piece = event["choices"][0]["text"]
                    if piece:
                        text.append(piece)
                        self.chunks.append(time.monotonic())
                if not done:
                    return Outcome(i, start, time.monotonic(), "stream cut")
        except httpx.ConnectError:  # nothing listening: a client would retry, after a pause
            time.sleep(0.5)
            return Outcome(i, start, time.monotonic(), REFUSED)
        except httpx.HTTPError as err:
            return Outcome(i, start, time.monotonic(), f"connection {type(err).__name__}")
        return Outcome(i, start, time.monotonic(), None, "".join(text) == self.want[i])

    def rate(self, t0: float, t1: float) -> float:
        """Text chunks per second that arrived in [t0, t1)."""
        return sum(t0 <= t < t1 for t in self.chunks) / max(t1 - t0, 1e-9)


def _error_type(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return "unparsed body"


def recovery_s(load: Load, fault: float, baseline: float, end: float,
               window: float = 3.0, share: float = 0.8) -> float | None:
    """Seconds from the fault until a `window` first carries `share` of the baseline rate;
    None if none did before `end`."""
    t = fault
    while t + window <= end:
        if load.rate(t, t + window) >= share * baseline:
            return t - fault
        t += 0.5
    return None
