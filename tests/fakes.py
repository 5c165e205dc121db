"""A fake engine behind the real CLI: captions every request at once (``fake:<id>#<chunk>``; a text-only
request, an item's track row, ``fake-track:<id>``), with
hooks to inject faults; tests hand it to flamingo through ``Environment(engine=...)`` (the ``fake``
fixture in conftest.py)."""

from __future__ import annotations

import queue
import time
from typing import Any

from flamingo_cli.engine import END, request_seed
from flamingo_cli.records import Result

LOOP = "la " * 12  # what a looping item says below its temperature (flagged repetition)


class FakeEngine:
    """Captions every request at once: ``fake:<id>#<chunk>``. Hooks inject faults after N results."""

    def __init__(self) -> None:
        self.versions = {"vllm": "fake"}
        self.fail_ids: set[str] = set()  # these items' chunks come back as engine errors
        self.after: dict[int, Any] = {}  # n -> callable run after the n-th result (1-based)
        self.delay = 0.0
        self.results = 0
        self.requests: list[tuple[str, int]] = []
        # Text-only requests (an item's track row, issue 26): their chunk key and the prompt text sent.
        self.text_requests: list[tuple[tuple[str, int], str]] = []
        # request -> caption, instead of ``fake:<id>#<chunk>`` (e.g. captions with timestamps).
        self.caption: Any = None
        # Confidence (issue 25b): every caption's avg_logprob (when the run asks for log-probabilities);
        # items in ``loop`` loop (LOOP, cut at max tokens) below their temperature there (inf: always),
        # their avg_logprob ``loop_logprob(temperature)``. A re-ask (attempt > 0) captions
        # ``fake:<id>#<chunk> t=<temperature> seed=<its seed>``.
        self.logprob = -0.25
        self.loop: dict[str, float] = {}
        self.loop_logprob: Any = lambda t: -0.5 - abs(t - 0.4)
        self.asked: list[tuple[str, int, int, float, int | None]] = []  # id, chunk, attempt, temperature, seed
        self.batch = 1  # requests taken from the feed before answering them

    def effective_sampling(self, sampling: Any) -> dict[str, Any]:
        return sampling.identity()

    def run(self, feed: queue.Queue, sampling: Any, on_step: Any = None):
        while True:
            # Take up to ``batch`` requests (as vLLM holds many at once), then answer them in order.
            batch, ended = [], False
            while len(batch) < self.batch:
                try:
                    request = feed.get(block=not batch, timeout=0.02)  # block only holding nothing
                except queue.Empty:
                    if on_step:
                        on_step()
                    if batch:
                        break
                    continue
                if request is END:
                    ended = True
                    break
                batch.append(request)
            for request in batch:
                yield from self._one(request, sampling, on_step)
            if ended:
                return

    def _one(self, request: Any, sampling: Any, on_step: Any):
        chunk = request.chunk
        self.requests.append(chunk.key)
        if self.delay:
            time.sleep(self.delay)
        if on_step:
            on_step()
        text_only = chunk.samples is None
        if text_only:
            assert "<sound>" not in request.text, "a text-only request carries no audio placeholder"
            self.text_requests.append((chunk.key, request.text))
        self.results += 1
        if chunk.item.id in self.fail_ids:
            yield Result(chunk=chunk, prompt=request.prompt, error="rejected by the engine: injected")
        else:
            yield self._answer(request, request.sampling or sampling)
        hook = self.after.get(self.results)
        if hook is not None:
            hook()

    def _answer(self, request: Any, sampling: Any) -> Result:
        chunk = request.chunk
        t = float(sampling.temperature or 0.0)
        seed = request_seed(sampling.seed or 0, request) if t > 0 else None
        self.asked.append((chunk.item.id, chunk.index, request.attempt, t, seed))
        looping = t < self.loop.get(chunk.item.id, -1.0)
        text_only = chunk.samples is None
        caption = f"fake-track:{chunk.item.id}" if text_only else f"fake:{chunk.item.id}#{chunk.index}"
        if self.caption is not None:
            caption = self.caption(request)
        if looping:
            caption = LOOP
        elif request.attempt:
            caption += f" t={t:g} seed={seed}"
        logprob = self.loop_logprob(t) if chunk.item.id in self.loop else self.logprob
        return Result(
            chunk=chunk,
            prompt=request.prompt,
            caption=caption,
            finish_reason="length" if looping else "stop",
            prompt_tokens=10,
            output_tokens=12 if looping else 3,
            avg_logprob=logprob if getattr(sampling, "logprobs", False) else None,
        )

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass
