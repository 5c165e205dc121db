"""Wires the stages: sources -> audio -> chunking -> prompts -> engine -> sink.

A producer thread walks the inputs, skips what the sink already holds, decodes in a thread pool
(soundfile/soxr release the GIL) and puts Requests on a bounded queue; the main thread runs the engine
over that queue and writes Results as they finish. Memory stays bounded: at most ``workers * 2``
decoded files wait for the engine, plus the engine's own in-flight cap. Only this module knows every
stage.

Resume and incremental runs: an item is skipped when the sink's ``ResumeIndex`` holds all its chunks
and its file is unchanged (size and mtime, or sha256 with ``CaptionJob.content_hash``; see
``sources.source_changed``). A changed file is captioned again, whole, under the next
``source_version`` (the sink's docstring has the reading rule).

Stopping: when ``stop_event`` is set the producer stops, requests still waiting in the feed are
dropped (resume redoes them) and the engine finishes what it already runs. Results the engine
reports as aborted (vLLM's own shutdown on SIGINT/SIGTERM) are not written, so resume redoes them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from flamingo_cli.audio import AudioDecodeError, decode, probe_duration
from flamingo_cli.chunking import chunk_audio
from flamingo_cli.engine import END, Sampling
from flamingo_cli.models import WINDOW_S
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import AudioItem, Chunk, DecodedAudio, Result
from flamingo_cli.schema import output_check
from flamingo_cli.sink import ResumeIndex, error_result
from flamingo_cli.sources import Fingerprint, fingerprint, source_changed


class ResultSink(Protocol):
    def write(self, result: Result) -> None: ...


@dataclass
class Stats:
    """Counters the progress display and the end-of-run summary read; updated under a lock."""

    items_seen: int = 0
    items_skipped: int = 0  # already in the output
    items_queued: int = 0
    items_failed: int = 0  # failed before chunking
    chunks_queued: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    chunks_dropped: int = 0  # queued or aborted when a stop came; redone on resume
    items_changed: int = 0  # captioned again because their file changed
    audio_s_queued: float = 0.0
    audio_s_done: float = 0.0
    windows_done: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    sources_exhausted: bool = False
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}


@dataclass
class CaptionJob:
    """What to caption and how; built by the CLI or by Python callers."""

    inputs: list[str]
    prompts: PromptBuilder
    prompt: str
    max_chunk_s: float
    sampling: Sampling
    chunk_s: float | None = None
    overlap_s: float = 0.0
    extensions: Iterable[str] | None = None
    workers: int = 4
    queue_size: int = 64
    retry_failed: bool = False
    use_row_prompts: bool = True
    content_hash: bool = False  # detect changed files by sha256 instead of size + mtime
    # Seconds of audio held ahead of the engine: decoded items waiting for the feed, and chunks waiting in
    # it. Counts alone (workers * 2 items, queue_size requests) let 3-hour files pile up to GBs.
    max_pending_audio_s: float = 3600.0
    max_feed_audio_s: float = 3600.0


@dataclass(slots=True)
class _Plan:
    """What to do with one item: its source fingerprint, the version its rows get, which chunks to skip."""

    source: Fingerprint | None
    version: int
    fresh: bool  # a new version (or a new item): write every chunk
    wanted: bool = True


@dataclass(slots=True)
class _Prepared:
    plan: _Plan
    decoded: DecodedAudio | None = None
    error: str | None = None


# Files smaller than this decode to little (about a minute of MP3): no header read to size them.
_PROBE_BYTES = 1 << 20


def _span(request: Any) -> float:
    return 0.0 if request is END else request.chunk.end_s - request.chunk.start_s


class _Feed(queue.Queue):
    """The requests waiting for the engine, bounded by count and by seconds of audio (never empty-refusing)."""

    def __init__(self, maxsize: int, max_audio_s: float) -> None:
        super().__init__(maxsize)
        self.max_audio_s = max_audio_s
        self.audio_s = 0.0

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.audio_s += _span(item)

    def _get(self) -> Any:
        item = super()._get()
        self.audio_s -= _span(item)
        return item

    def _qsize(self) -> int:
        n = super()._qsize()
        # Over the audio budget the feed reports itself full, so put() waits until the engine takes some.
        return max(n, self.maxsize) if n and self.audio_s >= self.max_audio_s else n


def _windows(chunk: Chunk) -> int:
    return max(1, -(-round((chunk.end_s - chunk.start_s) * 1000) // (WINDOW_S * 1000)))


class Planner:
    """The per-item decisions every executor shares (this pipeline, the Ray path): unique ids, skip,
    finish or redo from what the output holds, which chunks are left, which prompt. No I/O but a stat."""

    def __init__(self, job: CaptionJob, index: ResumeIndex | None, stats: Stats) -> None:
        self.job, self.index, self.stats = job, index, stats
        self._seen_ids: dict[str, int] = {}

    def unique(self, item: AudioItem) -> AudioItem:
        """Two inputs may yield the same id; the second gets a suffix and an error row."""
        count = self._seen_ids.get(item.id, 0)
        self._seen_ids[item.id] = count + 1
        if count == 0:
            return item
        reason = item.error or f"duplicate id {item.id!r} ({item.path} and an earlier input)"
        return AudioItem(id=f"{item.id}#{count}", path=item.path, origin=item.origin, extra=item.extra, error=reason)

    def plan(self, item: AudioItem, source: Fingerprint | None) -> _Plan:
        """Skip, finish or redo the item, from what the output holds and the file now."""
        index = self.index
        if index is None or item.id not in index:
            version = 0 if index is None else (index.version(item.id) or 0)
            return _Plan(source, version, fresh=True)
        version = index.version(item.id)
        if index.source_recorded(item.id) and source_changed(
            index.recorded_source(item.id), source, self.job.content_hash
        ):
            with self.stats.lock:
                self.stats.items_changed += 1
            return _Plan(source, (version or 0) + 1, fresh=True)
        plan = _Plan(source, version or 0, fresh=False)
        if self.job.retry_failed and index.is_failed(item.id):
            return plan
        plan.wanted = not index.is_done(item.id)
        return plan

    def done_chunks(self, item: AudioItem, plan: _Plan) -> set[int]:
        """Chunk indexes already on disk for this version (failed ones count as not done with --retry-failed)."""
        if plan.fresh or self.index is None:
            return set()
        done = self.index.done_chunks(item.id)
        if self.job.retry_failed:
            done -= self.index.failed_chunks(item.id)
        return done

    def prompt(self, item: AudioItem) -> str:
        """The manifest row's own prompt where it has one (and row prompts are on), else the job's."""
        job = self.job
        return (item.prompt if job.use_row_prompts and item.prompt else None) or job.prompt


class Producer(threading.Thread):
    """Sources -> decode pool -> chunks -> Requests on the feed; error rows straight to the sink."""

    def __init__(
        self,
        job: CaptionJob,
        items: Iterator[AudioItem],
        feed: queue.Queue,
        sink: ResultSink,
        stats: Stats,
        index: ResumeIndex | None,
    ) -> None:
        super().__init__(name="flamingo-producer", daemon=True)
        self.job, self.items, self.feed, self.sink, self.stats = job, items, feed, sink, stats
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.planner = Planner(job, index, stats)
        self._begin = getattr(sink, "begin_item", None)

    @staticmethod
    def _audio_estimate(item: AudioItem, plan: _Plan | None) -> float:
        """Seconds the item decodes to, from its header (0 for small files: not worth the read)."""
        if item.duration is not None:
            return float(item.duration)
        if plan is not None and plan.source is not None and plan.source.size < _PROBE_BYTES:
            return 0.0
        return probe_duration(item.path) or 0.0

    def _put(self, obj: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.feed.put(obj, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, item: AudioItem, decoded: DecodedAudio, plan: _Plan) -> None:
        job = self.job
        chunks = chunk_audio(decoded, job.max_chunk_s, job.chunk_s, job.overlap_s)
        prompt = self.planner.prompt(item)
        done = self.planner.done_chunks(item, plan)
        todo = [c for c in chunks if c.index not in done]
        if self._begin is not None:
            self._begin(item.id, plan.source, plan.version, len(todo))
        # Chunks are views of the decoded array; with several, each request gets its own copy, so a
        # chunk in flight holds its own seconds, not the whole (possibly 3-hour) track.
        copy = len(chunks) > 1
        for chunk in todo:
            if chunk.error:
                self.sink.write(Result(chunk=chunk, prompt=prompt, error=chunk.error))
                with self.stats.lock:
                    self.stats.chunks_failed += 1
                continue
            with self.stats.lock:
                self.stats.chunks_queued += 1
                self.stats.audio_s_queued += chunk.end_s - chunk.start_s
            if copy:
                chunk.samples = chunk.samples.copy()
            if not self._put(job.prompts.request(chunk, prompt)):
                return

    def _fail(self, item: AudioItem, reason: str, plan: _Plan) -> None:
        if self._begin is not None:
            self._begin(item.id, plan.source, plan.version, 1)
        self.sink.write(error_result(item, reason))
        with self.stats.lock:
            self.stats.items_failed += 1

    def _prepare(self, item: AudioItem, plan: _Plan | None) -> _Prepared:
        """In a pool thread: (with --hash) fingerprint and plan the item, then decode it if wanted."""
        if plan is None:
            plan = self.planner.plan(item, fingerprint(item.path, content_hash=True))
            if not plan.wanted:
                return _Prepared(plan)
        try:
            return _Prepared(plan, decoded=decode(item))
        except AudioDecodeError as exc:
            return _Prepared(plan, error=str(exc))
        except Exception as exc:
            return _Prepared(plan, error=f"{item.path}: unexpected decode error: {type(exc).__name__}: {exc}")

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
        finally:
            self.stats.sources_exhausted = True
            self._put(END)

    def _run(self) -> None:
        pending: deque[tuple[AudioItem, Future, float]] = deque()
        pending_s = 0.0
        with ThreadPoolExecutor(max_workers=max(1, self.job.workers), thread_name_prefix="flamingo-decode") as pool:
            for item in self.items:
                if self.stop_event.is_set():
                    break
                item = self.planner.unique(item)
                with self.stats.lock:
                    self.stats.items_seen += 1
                plan: _Plan | None = None
                if item.error:  # bad before decoding (missing file, bad manifest row): nothing to stat
                    plan = self.planner.plan(item, None)
                elif not self.job.content_hash:
                    # The stat comes before the decode: a file changed in between is redone next run.
                    plan = self.planner.plan(item, fingerprint(item.path))
                if plan is not None and not plan.wanted:
                    with self.stats.lock:
                        self.stats.items_skipped += 1
                    continue
                if item.error:
                    assert plan is not None
                    self._fail(item, item.error, plan)
                    continue
                # With --hash the pool hashes, plans and decodes (hashing reads the whole file).
                est = self._audio_estimate(item, plan)
                pending.append((item, pool.submit(self._prepare, item, plan), est))
                pending_s += est
                # Emit in input order; keep at most workers*2 decodes, and max_pending_audio_s of audio
                # (one item always), ahead of the engine.
                while (
                    len(pending) >= max(2, self.job.workers * 2)
                    or (len(pending) > 1 and pending_s > self.job.max_pending_audio_s)
                    or (pending and pending[0][1].done())
                ):
                    pending_s -= self._drain_one(pending)
            while pending and not self.stop_event.is_set():
                pending_s -= self._drain_one(pending)
            for _, fut, _ in pending:
                fut.cancel()

    def _drain_one(self, pending: deque[tuple[AudioItem, Future, float]]) -> float:
        """Emit the oldest pending item; returns its audio estimate (now off the producer's books)."""
        item, fut, est = pending.popleft()
        self._emit_prepared(item, fut.result())
        return est

    def _emit_prepared(self, item: AudioItem, prepared: _Prepared) -> None:
        plan = prepared.plan
        if not plan.wanted:
            with self.stats.lock:
                self.stats.items_skipped += 1
            return
        with self.stats.lock:
            self.stats.items_queued += 1
        if prepared.error is not None:
            self._fail(item, prepared.error, plan)
            return
        assert prepared.decoded is not None
        try:
            self._emit(item, prepared.decoded, plan)
        except ValueError as exc:
            self._fail(item, f"{item.path}: {exc}", plan)


def run_pipeline(
    job: CaptionJob,
    items: Iterator[AudioItem],
    engine: Any,
    sink: ResultSink,
    stats: Stats | None = None,
    index: ResumeIndex | None = None,
    on_result: Callable[[Result], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    stop_event: threading.Event | None = None,
) -> Stats:
    """Run one caption job to the end (or until ``stop_event``); returns the counters."""
    stats = stats or Stats()
    feed: queue.Queue = _Feed(max(1, job.queue_size), job.max_feed_audio_s)
    producer = Producer(job, items, feed, sink, stats, index)
    if stop_event is not None:
        producer.stop_event = stop_event
    ended = False

    def step() -> None:
        # Called by the engine between steps and while it waits: on a stop, drop what waits in the
        # feed and end it, so the engine finishes only the requests it already runs.
        nonlocal ended
        if not ended and producer.stop_event.is_set():
            ended = True
            dropped = _end_feed(feed)
            with stats.lock:
                stats.chunks_dropped += dropped
        if on_tick:
            on_tick()

    check = output_check(job.sampling)
    producer.start()
    try:
        for result in engine.run(feed, job.sampling, on_step=step):
            if result.finish_reason == "abort" and result.error is None:
                # vLLM aborted it (its own SIGINT/SIGTERM shutdown): not a caption; resume redoes it.
                with stats.lock:
                    stats.chunks_dropped += 1
                continue
            if check is not None:
                result = check(result)
            sink.write(result)
            with stats.lock:
                if result.error:
                    stats.chunks_failed += 1
                else:
                    stats.chunks_done += 1
                    stats.audio_s_done += result.chunk.end_s - result.chunk.start_s
                    stats.windows_done += _windows(result.chunk)
                    stats.prompt_tokens += result.prompt_tokens or 0
                    stats.output_tokens += result.output_tokens or 0
            if on_result:
                on_result(result)
    finally:
        producer.stop_event.set()
        producer.join(timeout=10)
    if producer.error is not None:
        raise producer.error
    return stats


def _end_feed(feed: queue.Queue) -> int:
    """Empty the feed and put END on it; returns how many requests were dropped."""
    dropped = 0
    while True:
        try:
            while True:
                if feed.get_nowait() is not END:
                    dropped += 1
        except queue.Empty:
            pass
        try:
            feed.put_nowait(END)
            return dropped
        except queue.Full:  # a put that was under way when the stop came; drain again
            continue
