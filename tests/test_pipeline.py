"""The streaming pipeline (flamingo_cli/pipeline.py): what the engine receives and how much is held."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
from conftest import make_audio, read_rows

from flamingo_cli.audio import decode
from flamingo_cli.engine import END, Sampling
from flamingo_cli.models import AF3
from flamingo_cli.pipeline import CaptionJob, _Feed, run_pipeline
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import AudioItem, Chunk, Request, Result
from flamingo_cli.sink import Sink
from flamingo_cli.sources import iter_items


class Recorder:
    """Keeps every request it is given and answers at once."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def effective_sampling(self, sampling: Sampling) -> dict:
        return sampling.identity()

    def run(self, feed: queue.Queue, sampling: Sampling, on_step=None):
        while (request := feed.get()) is not END:
            self.requests.append(request)
            yield Result(chunk=request.chunk, prompt=request.prompt, caption="ok", finish_reason="stop")

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_chunks_of_a_long_item_own_their_samples(tmp_path: Path) -> None:
    """A chunk in flight must not keep its whole track alive: each of several chunks is its own array."""
    make_audio(tmp_path / "in" / "long.flac", 45.0, 22050, 2, seed=1)
    make_audio(tmp_path / "in" / "short.wav", 3.0, seed=2)
    job = CaptionJob([], PromptBuilder(AF3), "Describe.", 600.0, Sampling(max_tokens=8), chunk_s=20.0)
    engine = Recorder()
    with Sink(tmp_path / "out", "abcdef123456", {}, model="m", task="t") as sink:
        run_pipeline(job, iter_items([tmp_path / "in"]), engine, sink, index=sink.load_index())
    assert len(read_rows(tmp_path / "out")) == 4

    by_key = {r.chunk.key: r.chunk for r in engine.requests}
    whole = decode(AudioItem(id="long.flac", path=str(tmp_path / "in" / "long.flac"))).samples
    long_chunks = [by_key[("long.flac", i)] for i in range(3)]
    for chunk in long_chunks:
        assert chunk.samples.base is None and chunk.samples.flags.owndata  # a copy, not a view
        s = round(chunk.start_s * 16000)
        np.testing.assert_array_equal(chunk.samples, whole[s : s + len(chunk.samples)])
    assert [len(c.samples) for c in long_chunks] == [320000, 320000, 80000]
    assert len(by_key[("short.wav", 0)].samples) == 48000  # one chunk: the decoded array itself


def _request(seconds: float) -> Request:
    item = AudioItem(id=f"x{seconds}", path="/x.wav")
    chunk = Chunk(
        item=item,
        index=0,
        num_chunks=1,
        start_s=0.0,
        end_s=seconds,
        samples=np.zeros(1, np.float32),
        duration_s=seconds,
    )
    return Request(chunk=chunk, prompt="p", text="t")


def test_feed_is_bounded_by_seconds_of_audio_as_well_as_count() -> None:
    feed = _Feed(maxsize=10, max_audio_s=1000.0)
    feed.put(_request(600.0))
    feed.put(_request(600.0))  # one request always fits; now over the budget
    with pytest.raises(queue.Full):
        feed.put(_request(1.0), timeout=0.01)
    feed.get()
    feed.put(_request(1.0), timeout=0.01)  # 601 s queued: room again
    assert feed.qsize() == 2 and feed.audio_s == pytest.approx(601.0)
    for _ in range(8):
        feed.put(_request(1.0), timeout=0.01)
    with pytest.raises(queue.Full):  # and by count
        feed.put(_request(1.0), timeout=0.01)
    while not feed.empty():
        feed.get()
    assert feed.audio_s == pytest.approx(0.0)
