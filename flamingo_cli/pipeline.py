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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from flamingo_cli.audio import probe_duration
from flamingo_cli.engine import END
from flamingo_cli.fallback import Ladder
from flamingo_cli.gates import PARKED, Deduper, GateKeeper
from flamingo_cli.planner import CaptionJob, ItemDecision, Planner, ResultSink, Stats
from flamingo_cli.prepare import PreparedItem, prepare
from flamingo_cli.records import AudioItem, Request, Result, error_result
from flamingo_cli.resume import ResumeIndex, read_row, with_source
from flamingo_cli.schema import output_check
from flamingo_cli.tracks import Part, Tracks, budget_chars

__all__ = ["CaptionJob", "Planner", "Producer", "ResultSink", "Stats", "TaskRouter", "TaskRun", "run_pipeline"]


@dataclass(slots=True)
class _Prepared:
    decisions: list[ItemDecision]  # one per task
    ready: PreparedItem | None = None  # None when the decisions (made in the pool, with --hash) skip it


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


@dataclass
class TaskRun:
    """A further task of a several-task run (issue 26, ``--task a --task b``): its job, its own sink
    (its run key), its resume index and its track-row reader. ``run_pipeline``'s own are task 0's."""

    job: CaptionJob
    sink: Any
    index: ResumeIndex | None = None
    read_done: Callable[[str], list[Part]] | None = None


@dataclass
class _Lane:
    """One task of the run as the producer and the result loop see it; ``task`` is ``Chunk.task``."""

    task: int
    job: CaptionJob
    planner: Planner
    keeper: GateKeeper | None = None
    tracks: Tracks | None = None
    check: Callable[[Result], Result] | None = None


class Producer(threading.Thread):
    """Sources -> planner -> prepare pool -> Requests on the feed; error rows straight to the sink.

    Several tasks (``lanes``): an item is decoded when any task wants it; each chunk goes out once per
    task still missing it, back to back (vLLM's caches reuse the audio work), each request's chunk
    naming its task (``Chunk.task``) so its result reaches that task's sink."""

    def __init__(
        self,
        lanes: list[_Lane],
        items: Iterator[AudioItem],
        feed: queue.Queue,
        sink: ResultSink,
        stats: Stats,
    ) -> None:
        super().__init__(name="flamingo-producer", daemon=True)
        self.lanes = lanes
        self.job = lanes[0].job  # how items are cut and decoded: the tasks share it
        self.planner = lanes[0].planner  # unique ids: once per item, whatever the tasks
        self.items, self.feed, self.sink, self.stats = items, feed, sink, stats
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._sink_begin = getattr(sink, "begin_item", None)
        self.several = len(lanes) > 1

    def _begin(self, lane: _Lane, item_id: str, source: Any, version: int, rows: int) -> None:
        if self._sink_begin is None:
            return
        if self.several:  # the router hands it to the task's own sink
            self._sink_begin(item_id, source, version, rows, task=lane.task)
        else:
            self._sink_begin(item_id, source, version, rows)

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

    def _decide(self, item: AudioItem, source: Any) -> list[ItemDecision]:
        return [lane.planner.decide(item, source) for lane in self.lanes]

    def _fail(self, item: AudioItem, reason: str, decisions: list[ItemDecision]) -> None:
        for lane, decision in zip(self.lanes, decisions, strict=True):
            if not decision.wanted:
                continue
            self._begin(lane, item.id, decision.source, decision.version, 1)
            result = error_result(item, reason)
            result.chunk.task = lane.task
            self.sink.write(result)
            self.stats.add_result(result)

    def _prepare(self, item: AudioItem, decisions: list[ItemDecision] | None) -> _Prepared:
        """In a pool thread: (with --hash) fingerprint the item and decide, then prepare it if wanted."""
        if decisions is None:
            item = with_source(item, content_hash=True)
            decisions = self._decide(item, item.source)
            if not _decodes(decisions):
                return _Prepared(decisions)
        job = self.job
        skips = [
            lane.planner.done_chunks(item, d)
            for lane, d in zip(self.lanes, decisions, strict=True)
            if d.wanted and not d.track_only
        ]
        ready = prepare(
            item,
            max_chunk_s=job.max_chunk_s,
            chunk_s=job.chunk_s,
            overlap_s=job.overlap_s,
            prompts=job.prompts,
            prompt=self.planner.prompt(item),
            skip=set.intersection(*skips) if skips else set(),  # a chunk every task has already
            gates=job.gates,
        )
        return _Prepared(decisions, ready)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by the main thread
            self.error = exc
        finally:
            self.stats.sources_exhausted = True
            for lane in self.lanes:  # the last items' track requests go out before END
                if lane.tracks is not None:
                    lane.tracks.wait(self.stop_event)
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
                decisions: list[ItemDecision] | None = None
                if item.error:  # bad before decoding (missing file, bad manifest row): nothing to stat
                    decisions = self._decide(item, None)
                elif item.source is not None or not self.job.content_hash:
                    # The stat comes before the decode: a file changed in between is redone next run. The
                    # survey may have taken it (and the hash) already; the decoder reads it from the item.
                    item = with_source(item)
                    decisions = self._decide(item, item.source)
                if decisions is not None and not any(d.wanted for d in decisions):
                    with self.stats.lock:
                        self.stats.items_skipped += 1
                    continue
                if item.error:
                    assert decisions is not None
                    self._fail(item, item.error, decisions)
                    continue
                if decisions is not None and not _decodes(decisions):
                    self._track_only(item, decisions)
                    continue
                # With --hash the pool hashes, decides and prepares (hashing reads the whole file).
                est = self._audio_estimate(item, decisions[0] if decisions else None)
                pending.append((item, pool.submit(self._prepare, item, decisions), est))
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

    def _track_only(self, item: AudioItem, decisions: list[ItemDecision], queued: bool = True) -> None:
        """Every chunk is on disk but not the track row: ask for that alone, from the rows (no decode)."""
        if queued:
            with self.stats.lock:
                self.stats.items_queued += 1
        lanes = [(lane, d) for lane, d in zip(self.lanes, decisions, strict=True) if d.track_only]
        for lane, decision in lanes:  # every task's rows announced before any is asked for
            self._begin(lane, item.id, decision.source, decision.version, 1)
        for lane, _ in lanes:
            self._expect_track_only(lane, item)

    def _expect_track_only(self, lane: _Lane, item: AudioItem) -> None:
        index = lane.planner.index
        assert lane.tracks is not None and index is not None
        lane.tracks.expect(item, len(index.done_chunks(item.id)), float("nan"), pending=(), done_on_disk=True)

    def _emit_prepared(self, item: AudioItem, prepared: _Prepared) -> None:
        decisions = prepared.decisions
        if not any(d.wanted for d in decisions):
            with self.stats.lock:
                self.stats.items_skipped += 1
            return
        if not _decodes(decisions):
            self._track_only(item, decisions)
            return
        with self.stats.lock:
            self.stats.items_queued += 1
        ready = prepared.ready
        assert ready is not None
        if ready.error is not None:
            self._fail(item, ready.error, decisions)
            return
        for request in ready.requests:
            # Chunks are views of the decoded array; with several, each gets its own copy (one for all
            # tasks), so a chunk in flight holds its own seconds, not the whole (possibly 3-hour) track.
            chunk = request.chunk
            if chunk.num_chunks > 1 and chunk.samples is not None and not chunk.error:
                chunk.samples = chunk.samples.copy()
        num_chunks = ready.requests[0].chunk.num_chunks if ready.requests else 0
        # Each task's requests: the chunks it still needs, its prompt and sampling, its task on the chunk;
        # every task's rows are announced (begin_item) before any is written or asked for.
        per_lane: list[list[Request | None]] = []
        for lane, decision in zip(self.lanes, decisions, strict=True):
            if not decision.wanted:
                per_lane.append([])
            elif decision.track_only:  # a task with only its track row left
                per_lane.append([])
                self._begin(lane, item.id, decision.source, decision.version, 1)
            else:
                per_lane.append(self._lane_requests(lane, item, decision, ready.requests))
                rows = sum(r is not None for r in per_lane[-1]) + self._wants_track(lane, num_chunks)
                # the track row is one of the item's rows (its source version too)
                self._begin(lane, item.id, decision.source, decision.version, rows)
        for lane, decision, aligned in zip(self.lanes, decisions, per_lane, strict=True):
            if decision.wanted and decision.track_only:
                self._expect_track_only(lane, item)
            elif aligned and self._wants_track(lane, num_chunks):
                assert lane.tracks is not None
                requests = [r for r in aligned if r is not None]
                lane.tracks.expect(
                    item,
                    num_chunks,
                    ready.requests[0].chunk.duration_s,
                    pending={r.chunk.index for r in requests if not r.chunk.error},
                    failed=[r.chunk for r in requests if r.chunk.error],
                    done_on_disk=len(requests) < num_chunks,
                )
        # Chunk by chunk, every task's request for it back to back: vLLM reuses the audio work.
        for position in range(len(ready.requests)):
            for lane, requests in zip(self.lanes, per_lane, strict=True):
                request = requests[position] if position < len(requests) else None
                if request is not None and not self._emit(lane, request):
                    return

    @staticmethod
    def _wants_track(lane: _Lane, num_chunks: int) -> bool:
        return lane.tracks is not None and lane.tracks.wants(num_chunks)

    def _lane_requests(
        self, lane: _Lane, item: AudioItem, decision: ItemDecision, prepared: list[Request]
    ) -> list[Request | None]:
        """This task's request per prepared chunk (None where it has the chunk already): task 0 takes the
        prepared requests themselves, the others a copy of each chunk (same audio) with their prompt."""
        skip = lane.planner.done_chunks(item, decision)
        prompt = lane.planner.prompt(item)
        out: list[Request | None] = []
        for request in prepared:
            chunk = request.chunk
            if chunk.index in skip:
                out.append(None)
                continue
            if lane.task == 0:
                out.append(request)
                continue
            mine = replace(chunk, task=lane.task)  # shares the samples and the measures
            copy = lane.job.prompts.request(mine, prompt)
            copy.sampling = lane.job.sampling  # task 0's is the run's (engine.run's)
            out.append(copy)
        return out

    def _emit(self, lane: _Lane, request: Request) -> bool:
        chunk = request.chunk
        if chunk.error:
            self.sink.write(Result(chunk=chunk, prompt=request.prompt, error=chunk.error))
            with self.stats.lock:
                self.stats.chunks_failed += 1
            return True
        if self._gated(lane, request):
            return True
        with self.stats.lock:
            self.stats.chunks_queued += 1
            self.stats.requests_sent += 1
            self.stats.audio_s_queued += chunk.end_s - chunk.start_s
        return self._put(request)

    def _gated(self, lane: _Lane, request: Any) -> bool:
        """Silence or a duplicate: its row is written now (or, parked, after its original's)."""
        routed = lane.keeper.route(request) if lane.keeper is not None else None
        if routed is None:
            return False
        request.chunk.samples = None  # its row needs no audio (a parked one must not hold the track)
        with self.stats.lock:
            self.stats.chunks_queued += 1
        if routed is not PARKED:
            self.sink.write(routed)
            self.stats.add_result(routed)
            if lane.tracks is not None:  # a gated chunk is one of its item's parts too
                lane.tracks.result(routed)
        return True


def _decodes(decisions: list[ItemDecision]) -> bool:
    """Some task needs the item's audio (not only its track row, made from rows on disk)."""
    return any(d.wanted and not d.track_only for d in decisions)


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
    more_tasks: Sequence[TaskRun] = (),
) -> Stats:
    """Run one caption job to the end (or until ``stop_event``); returns the counters. ``read_done``
    reads an item's chunk rows back from the output (``tracks.read_chunk_rows``) for its track row.

    ``more_tasks``: the further tasks of a several-task run (one pass, each file decoded once); then
    ``sink`` takes every task's rows and hands each to its task's sink by ``result.chunk.task``
    (``TaskRouter``), with ``begin_item(..., task=i)``; ``job``, ``index``, ``read_done`` are task 0's."""
    stats = stats or Stats()
    feed = _Feed(max(1, job.queue_size), job.max_feed_audio_s)
    own_sink = sink.sinks[0] if more_tasks else sink  # type: ignore[attr-defined]
    specs = [(job, own_sink, index, read_done)] + [(t.job, t.sink, t.index, t.read_done) for t in more_tasks]
    lanes: list[_Lane] = []
    for task, (task_job, task_sink, task_index, task_read) in enumerate(specs):
        # the further tasks' planners count apart: a changed file is counted once (by task 0's)
        planner = Planner(task_job, task_index, stats if task == 0 else Stats())
        lane = _Lane(task, task_job, planner, gatekeeper(task_job, task_sink, task_index))
        lane.check = output_check(task_job.sampling)  # a schema task: invalid JSON becomes an error row
        if task_job.track_prompt is not None:
            lane.tracks = _tracks(lane, feed, sink, stats, engine, task_read, several=bool(more_tasks))
        lanes.append(lane)
    producer = Producer(lanes, items, feed, sink, stats)
    if stop_event is not None:
        producer.stop_event = stop_event
    ended = False
    # Flags every result; with --fallback re-asks flagged chunks through ``ladder.feed`` (fallback.py).
    ladder = Ladder(job, engine, stats, feed, jobs=[lane.job for lane in lanes])

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

    def written(lane: _Lane, result: Result) -> None:
        sink.write(result)
        stats.add_result(result)
        if lane.tracks is not None:
            lane.tracks.result(result)
        if on_result:
            on_result(result)

    producer.start()
    try:
        for result in engine.run(ladder.feed, job.sampling, on_step=step):
            lane = lanes[result.chunk.task]
            if result.finish_reason == "abort" and result.error is None:
                # vLLM aborted it (its own SIGINT/SIGTERM shutdown): not a caption; resume redoes it.
                ladder.dropped(result)
                with stats.lock:
                    stats.chunks_dropped += 1
                if lane.tracks is not None:
                    lane.tracks.abandon(result)
                continue
            result = ladder.judge(result)
            if result is None:  # asked again (--fallback): the chunk's row comes with its last attempt
                continue
            if lane.check is not None:
                result = lane.check(result)
            written(lane, result)
            for duplicate in lane.keeper.resolved(result) if lane.keeper is not None else ():
                written(lane, duplicate)
    finally:
        producer.stop_event.set()
        producer.join(timeout=10)
    if producer.error is not None:
        raise producer.error
    return stats


def _tracks(lane: _Lane, feed: _Feed, sink: Any, stats: Stats, engine: Any, read_done: Any, several: bool) -> Tracks:
    """A task's track rows (tracks.py): its requests and rows carry its task (and its sampling)."""
    # No reference to the lane (which holds the Tracks): a cycle would keep the sink, and its run lock,
    # alive past the run until the garbage collector ran.
    job, task = lane.job, lane.task

    def put(request: Request) -> None:
        request.chunk.task = task
        if several:
            request.sampling = job.sampling
        feed.put_extra(request)

    def write_row(result: Result) -> None:
        result.chunk.task = task
        sink.write(result)
        stats.add_result(result)

    assert job.track_prompt is not None
    budget = budget_chars(engine, job.sampling.max_tokens)
    return Tracks(job.track_prompt, job.prompts, put, write_row, read_done, budget)


class TaskRouter:
    """The sink of a several-task run: each result to its task's sink (``result.chunk.task``); the
    counts the summary reads are the sums; anything else is task 0's sink's."""

    def __init__(self, sinks: Sequence[Any]) -> None:
        self.sinks = list(sinks)

    def write(self, result: Result) -> None:
        self.sinks[result.chunk.task].write(result)

    def begin_item(self, item_id: str, source: Any, version: int, rows: int, task: int = 0) -> None:
        begin = getattr(self.sinks[task], "begin_item", None)
        if begin is not None:
            begin(item_id, source, version, rows)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def flush_if_due(self) -> None:
        for s in self.sinks:
            s.flush_if_due()

    @property
    def rows_written(self) -> int:
        return sum(int(getattr(s, "rows_written", 0)) for s in self.sinks)

    @property
    def buffered(self) -> int:
        return sum(int(getattr(s, "buffered", 0) or 0) for s in self.sinks)

    @property
    def parts_written(self) -> int | None:
        parts = [getattr(s, "parts_written", None) for s in self.sinks]
        return None if any(p is None for p in parts) else sum(parts)

    def __getattr__(self, name: str) -> Any:
        if name == "sinks":
            raise AttributeError(name)
        return getattr(self.sinks[0], name)


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
