"""The local executor: moves items from the sources through one host's engine into the sink.

A producer thread walks the inputs, asks the ``planner.Planner`` what to do with each, prepares the
wanted ones in a thread pool (``prepare.prepare``: decode, chunks, requests; soundfile/soxr release the
GIL) and puts the Requests on a bounded queue; the main thread runs the engine over that queue and
writes Results as they finish. Memory stays bounded: at most ``workers * 2`` prepared files wait for the
engine, plus the engine's own in-flight cap. The steps themselves live in their stage modules.

Resume and incremental runs: an item is skipped when the ``resume.ResumeIndex`` holds all its chunks
and its file is unchanged (size and mtime, or sha256 with ``CaptionJob.content_hash``; see
``resume.source_changed``). A changed file is captioned again, whole, under the next
``source_version`` (``output/layout.py``'s docstring has the reading rule).

Gates (``gates.py``, on when ``CaptionJob.gates`` is set): ``prepare`` measures every chunk; silent ones
and duplicates of a chunk already captioned (this invocation or an earlier one) get their rows here
without an engine request; a duplicate of a chunk still in flight is parked and written right after
its original's result. A stop leaves parked duplicates unwritten: resume redoes them.

Stopping: when ``stop_event`` is set the producer stops, requests still waiting in the feed are
dropped (resume redoes them) and the engine finishes what it already runs. Results the engine
reports as aborted (vLLM's own shutdown on SIGINT/SIGTERM) are not written, so resume redoes them.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flamingo_cli.audio import probe_duration
from flamingo_cli.engine import END
from flamingo_cli.fallback import Ladder
from flamingo_cli.gates import PARKED, Deduper, GateKeeper
from flamingo_cli.planner import CaptionJob, ItemDecision, Planner, ResultSink, Stats
from flamingo_cli.prepare import PreparedItem, prepare
from flamingo_cli.records import AudioItem, Result
from flamingo_cli.resume import ResumeIndex, read_row, with_source
from flamingo_cli.schema import output_check
from flamingo_cli.tracks import Part, Tracks, budget_chars

__all__ = ["CaptionJob", "Planner", "Producer", "ResultSink", "Stats", "run_pipeline"]


@dataclass(slots=True)
class _Prepared:
    decision: ItemDecision
    ready: PreparedItem | None = None  # None when the decision (made in the pool, with --hash) skips it


# Files smaller than this decode to little (about a minute of MP3): no header read to size them.
_PROBE_BYTES = 1 << 20


def _span(request: Any) -> float:
    return 0.0 if request is END else request.audio_s


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

    def put_extra(self, item: Any) -> None:
        """Put ``item`` now, past the bounds: a small text-only request (a track row) the result loop
        sends, which must never wait on the engine it runs."""
        with self.mutex:
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def _qsize(self) -> int:
        n = super()._qsize()
        # Over the audio budget the feed reports itself full, so put() waits until the engine takes some.
        return max(n, self.maxsize) if n and self.audio_s >= self.max_audio_s else n


class Producer(threading.Thread):
    """Sources -> planner -> prepare pool -> Requests on the feed; error rows straight to the sink."""

    def __init__(
        self,
        job: CaptionJob,
        items: Iterator[AudioItem],
        feed: queue.Queue,
        sink: ResultSink,
        stats: Stats,
        index: ResumeIndex | None,
        keeper: GateKeeper | None = None,
    ) -> None:
        super().__init__(name="flamingo-producer", daemon=True)
        self.keeper = keeper
        self.job, self.items, self.feed, self.sink, self.stats = job, items, feed, sink, stats
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.planner = Planner(job, index, stats)
        self._begin = getattr(sink, "begin_item", None)
        self.tracks: Tracks | None = None  # set by run_pipeline when items get track rows (tracks.py)

    @staticmethod
    def _audio_estimate(item: AudioItem, decision: ItemDecision | None) -> float:
        """Seconds the item decodes to, from its header (0 for small files: not worth the read)."""
        if item.duration is not None:
            return float(item.duration)
        if decision is not None and decision.source is not None and decision.source.size < _PROBE_BYTES:
            return 0.0
        return probe_duration(item) or 0.0

    def _put(self, obj: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.feed.put(obj, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fail(self, item: AudioItem, reason: str, decision: ItemDecision) -> None:
        self.planner.fail_item(self.sink, item, reason, decision)

    def _prepare(self, item: AudioItem, decision: ItemDecision | None) -> _Prepared:
        """In a pool thread: (with --hash) fingerprint the item and decide, then prepare it if wanted."""
        if decision is None:
            item = with_source(item, content_hash=True)
            decision = self.planner.decide(item, item.source)
            if not decision.wanted or decision.track_only:
                return _Prepared(decision)
        job = self.job
        ready = prepare(
            item,
            max_chunk_s=job.max_chunk_s,
            chunk_s=job.chunk_s,
            overlap_s=job.overlap_s,
            prompts=job.prompts,
            prompt=self.planner.prompt(item),
            skip=self.planner.done_chunks(item, decision),
            gates=job.gates,
        )
        return _Prepared(decision, ready)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
        finally:
            self.stats.sources_exhausted = True
            if self.tracks is not None:  # the last items' track requests go out before END
                self.tracks.wait(self.stop_event)
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
                decision: ItemDecision | None = None
                if item.error:  # bad before decoding (missing file, bad manifest row): nothing to stat
                    decision = self.planner.decide(item, None)
                elif item.source is not None or not self.job.content_hash:
                    # The stat comes before the decode: a file changed in between is redone next run. The
                    # survey may have taken it (and the hash) already; the decoder reads it from the item.
                    item = with_source(item)
                    decision = self.planner.decide(item, item.source)
                if decision is not None and not decision.wanted:
                    with self.stats.lock:
                        self.stats.items_skipped += 1
                    continue
                if item.error:
                    assert decision is not None
                    self._fail(item, item.error, decision)
                    continue
                if decision is not None and decision.track_only:
                    self._track_only(item, decision)
                    continue
                # With --hash the pool hashes, decides and prepares (hashing reads the whole file).
                est = self._audio_estimate(item, decision)
                pending.append((item, pool.submit(self._prepare, item, decision), est))
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

    def _track_only(self, item: AudioItem, decision: ItemDecision) -> None:
        """Every chunk is on disk but not the track row: ask for that alone, from the rows (no decode)."""
        with self.stats.lock:
            self.stats.items_queued += 1
        index = self.planner.index
        assert self.tracks is not None and index is not None
        if self._begin is not None:
            self._begin(item.id, decision.source, decision.version, 1)
        self.tracks.expect(item, len(index.done_chunks(item.id)), float("nan"), pending=(), done_on_disk=True)

    def _emit_prepared(self, item: AudioItem, prepared: _Prepared) -> None:
        decision = prepared.decision
        if not decision.wanted:
            with self.stats.lock:
                self.stats.items_skipped += 1
            return
        if decision.track_only:
            self._track_only(item, decision)
            return
        with self.stats.lock:
            self.stats.items_queued += 1
        ready = prepared.ready
        assert ready is not None
        if ready.error is not None:
            self._fail(item, ready.error, decision)
            return
        requests = ready.requests
        num_chunks = requests[0].chunk.num_chunks if requests else 0
        track = self.tracks is not None and self.tracks.wants(num_chunks)
        if self._begin is not None:  # the track row is one of the item's rows (its source version too)
            self._begin(item.id, decision.source, decision.version, len(requests) + track)
        if track:
            assert self.tracks is not None
            self.tracks.expect(
                item,
                num_chunks,
                requests[0].chunk.duration_s,
                pending={r.chunk.index for r in requests if not r.chunk.error},
                failed=[r.chunk for r in requests if r.chunk.error],
                done_on_disk=len(requests) < num_chunks,
            )
        for request in ready.requests:
            chunk = request.chunk
            if chunk.error:
                self.sink.write(Result(chunk=chunk, prompt=request.prompt, error=chunk.error))
                with self.stats.lock:
                    self.stats.chunks_failed += 1
                continue
            if self._gated(request):
                continue
            with self.stats.lock:
                self.stats.chunks_queued += 1
                self.stats.requests_sent += 1
                self.stats.audio_s_queued += chunk.end_s - chunk.start_s
            # Chunks are views of the decoded array; with several, each request gets its own copy, so a
            # chunk in flight holds its own seconds, not the whole (possibly 3-hour) track.
            if chunk.num_chunks > 1:
                chunk.samples = chunk.samples.copy()
            if not self._put(request):
                return

    def _gated(self, request: Any) -> bool:
        """Silence or a duplicate: its row is written now (or, parked, after its original's)."""
        routed = self.keeper.route(request) if self.keeper is not None else None
        if routed is None:
            return False
        request.chunk.samples = None  # its row needs no audio (a parked one must not hold the track)
        with self.stats.lock:
            self.stats.chunks_queued += 1
        if routed is not PARKED:
            self.sink.write(routed)
            self.stats.add_result(routed)
            if self.tracks is not None:  # a gated chunk is one of its item's parts too
                self.tracks.result(routed)
        return True


def gatekeeper(job: CaptionJob, sink: Any, index: ResumeIndex | None) -> GateKeeper | None:
    """The run's gates: duplicates known from the resume index, their answers read from the output
    (``resume.read_row``, after a flush) only when one is needed."""
    if job.gates is None:
        return None
    out, key = getattr(sink, "out_dir", None), getattr(sink, "run_key", None)

    def fetch(item_id: str, chunk_index: int) -> dict | None:
        if out is None or key is None:
            return None
        sink.flush()
        return read_row(out, key, item_id, chunk_index)

    on_disk = index.audio_original if index is not None else None
    return GateKeeper(job.gates, Deduper(on_disk, fetch))


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
    read_done: Callable[[str], list[Part]] | None = None,
) -> Stats:
    """Run one caption job to the end (or until ``stop_event``); returns the counters. ``read_done``
    reads an item's chunk rows back from the output (``tracks.read_chunk_rows``) for its track row."""
    stats = stats or Stats()
    feed = _Feed(max(1, job.queue_size), job.max_feed_audio_s)
    keeper = gatekeeper(job, sink, index)
    producer = Producer(job, items, feed, sink, stats, index, keeper)
    tracks = None
    if job.track_prompt is not None:

        def write_row(result: Result) -> None:
            sink.write(result)
            stats.add_result(result)

        budget = budget_chars(engine, job.sampling.max_tokens)
        tracks = Tracks(job.track_prompt, job.prompts, feed.put_extra, write_row, read_done, budget)
        producer.tracks = tracks
    if stop_event is not None:
        producer.stop_event = stop_event
    ended = False
    # Flags every result; with --fallback re-asks flagged chunks through ``ladder.feed`` (fallback.py).
    ladder = Ladder(job, engine, stats, feed)

    def step() -> None:
        # Called by the engine between steps and while it waits: on a stop, drop what waits in the
        # feed and end it, so the engine finishes only the requests it already runs.
        nonlocal ended
        if not ended and producer.stop_event.is_set():
            ended = True
            dropped = _end_feed(feed) + ladder.stop()
            with stats.lock:
                stats.chunks_dropped += dropped
            drop_waiting = getattr(engine, "drop_waiting", None)
            if drop_waiting is not None:  # requests the engine holds but has not started: dropped too
                drop_waiting()
        if on_tick:
            on_tick()

    check = output_check(job.sampling)  # a schema run: invalid JSON becomes an error row that says why
    producer.start()
    try:
        for result in engine.run(ladder.feed, job.sampling, on_step=step):
            if result.finish_reason == "abort" and result.error is None:
                # vLLM aborted it (its own SIGINT/SIGTERM shutdown): not a caption; resume redoes it.
                ladder.dropped(result)
                with stats.lock:
                    stats.chunks_dropped += 1
                if tracks is not None:
                    tracks.abandon(result)
                continue
            result = ladder.judge(result)
            if result is None:  # asked again (--fallback): the chunk's row comes with its last attempt
                continue
            if check is not None:
                result = check(result)
            sink.write(result)
            stats.add_result(result)
            if tracks is not None:
                tracks.result(result)
            if on_result:
                on_result(result)
            for duplicate in keeper.resolved(result) if keeper is not None else ():
                sink.write(duplicate)
                stats.add_result(duplicate)
                if tracks is not None:
                    tracks.result(duplicate)
                if on_result:
                    on_result(duplicate)
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
