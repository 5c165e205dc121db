"""A fake engine behind the real CLI: captions every request at once (``fake:<id>#<chunk>``; a text-only
request, an item's track row, ``fake-track:<id>``), with
hooks to inject faults; tests hand it to flamingo through ``Environment(engine=...)`` (the ``fake``
fixture in conftest.py)."""

from __future__ import annotations

import queue
import time
from typing import Any

from flamingo_cli.engine import END
from flamingo_cli.records import Result


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

    def effective_sampling(self, sampling: Any) -> dict[str, Any]:
        return sampling.identity()

    def run(self, feed: queue.Queue, sampling: Any, on_step: Any = None):
        while True:
            try:
                request = feed.get(timeout=0.02)
            except queue.Empty:
                if on_step:
                    on_step()
                continue
            if request is END:
                return
            chunk = request.chunk
            self.requests.append(chunk.key)
            text_only = chunk.samples is None
            if text_only:
                assert "<sound>" not in request.text, "a text-only request carries no audio placeholder"
                self.text_requests.append((chunk.key, request.text))
            if self.delay:
                time.sleep(self.delay)
            if on_step:
                on_step()
            self.results += 1
            if chunk.item.id in self.fail_ids:
                yield Result(chunk=chunk, prompt=request.prompt, error="rejected by the engine: injected")
            else:
                default = f"fake-track:{chunk.item.id}" if text_only else f"fake:{chunk.item.id}#{chunk.index}"
                yield Result(
                    chunk=chunk,
                    prompt=request.prompt,
                    caption=self.caption(request) if self.caption is not None else default,
                    finish_reason="stop",
                    prompt_tokens=10,
                    output_tokens=3,
                )
            hook = self.after.get(self.results)
            if hook is not None:
                hook()

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass
