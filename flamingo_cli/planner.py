"""What to do with each item, given the output so far — shared by every executor.

The local pipeline (``pipeline.py``) and the Ray path (``ray_data.py``) differ in how work is spread;
what the work *is* lives here once: the job record, unique ids, skip / finish / redo against the
``ResumeIndex`` (changed files get the next ``source_version``), which chunks are left, which prompt,
the error row of an item that failed before its chunks, and the counters (``Stats``) with the one
window formula. No I/O here but the ``begin_item``/``write`` calls on the sink it is handed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flamingo_cli.models import WINDOW_S
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import (
    TRACK_INDEX,
    AudioItem,
    Fingerprint,
    Result,
    Sampling,
    SeenIds,
    duplicate_reason,
    duplicate_row,
    error_result,
)
from flamingo_cli.resume import ResumeIndex


class ResultSink(Protocol):
    def write(self, result: Result) -> None: ...


def windows(start_s: float, end_s: float) -> int:
    """30-s encoder windows a span of audio takes (the unit of GPU work in every report)."""
    return max(1, -(-round((end_s - start_s) * 1000) // (WINDOW_S * 1000)))


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
    # gates: chunks written without an engine request (silence, duplicates; counted in chunks_done or,
    # a duplicate of a failed original, chunks_failed), and the requests the engine was sent
    chunks_silent: int = 0
    chunks_duplicate: int = 0
    requests_sent: int = 0
    audio_s_queued: float = 0.0
    audio_s_done: float = 0.0
    windows_done: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    tracks_done: int = 0  # track rows (issue 26) written with a caption
    tracks_failed: int = 0
    # confidence (issue 25b): rows written with flags, by reason; --fallback's re-asks (fallback.py)
    flags: dict[str, int] = field(default_factory=dict)
    rows_flagged: int = 0
    fallback_chunks: int = 0  # chunks asked again at least once
    fallback_attempts: int = 0  # re-asks made (requests beyond each chunk's first)
    fallback_recovered: int = 0  # re-asked chunks whose kept attempt has none of the re-ask flags
    sources_exhausted: bool = False
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {k: dict(v) if isinstance(v, dict) else v for k, v in self.__dict__.items() if k != "lock"}

    def add_result(self, result: Result, queued: bool = False) -> None:
        """Count one written Result. ``queued``: the executor did not count the chunk when it was sent
        (the Ray path learns of chunks only as they come back)."""
        chunk = result.chunk
        with self.lock:
            if chunk.index == TRACK_INDEX:  # an item's track row: no audio of its own
                if result.error:
                    self.tracks_failed += 1
                else:
                    self.tracks_done += 1
                    self.prompt_tokens += result.prompt_tokens or 0
                    self.output_tokens += result.output_tokens or 0
                return
            if chunk.num_chunks == 0:  # the item failed before chunking (its one error row)
                self.items_failed += 1
                return
            span = chunk.end_s - chunk.start_s
            if result.gate is not None:  # no engine request: counted apart, not as GPU work
                self.chunks_queued += int(queued)
                self.chunks_silent += result.gate == "silence"
                self.chunks_duplicate += result.gate == "duplicate"
                if result.error:
                    self.chunks_failed += 1
                else:
                    self.chunks_done += 1
                return
            if queued:
                self.chunks_queued += 1
                self.requests_sent += chunk.error is None
                if not result.error:
                    self.audio_s_queued += span
            if result.error:
                self.chunks_failed += 1
                return
            self.chunks_done += 1
            self.audio_s_done += span
            self.windows_done += windows(chunk.start_s, chunk.end_s)
            self.prompt_tokens += result.prompt_tokens or 0
            self.output_tokens += result.output_tokens or 0
            if result.flags:
                self.rows_flagged += 1
                for flag in result.flags:
                    self.flags[flag] = self.flags.get(flag, 0) + 1


@dataclass
class CaptionJob:
    """What to caption and how, as the executors need it (built by ``spec.CaptionSpec.job``)."""

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
    gates: Any = None  # gates.GateSettings: measures, silence and duplicates (None: no gates, no measures)
    # The instruction of the track row an item cut into several chunks gets (tracks.py); None: none.
    track_prompt: str | None = None
    # confidence (issue 25b): the flag thresholds (quality.QualityRules; None: the defaults) and
    # --fallback's policy (fallback.FallbackPolicy; None: off)
    quality: Any = None
    fallback: Any = None


@dataclass(slots=True)
class ItemDecision:
    """What to do with one item: its source fingerprint, the version its rows get, which chunks to skip."""

    source: Fingerprint | None
    version: int
    fresh: bool  # a new version (or a new item): write every chunk
    wanted: bool = True
    track_only: bool = False  # every chunk is written but not its track row: only that is left (no decode)


class Planner:
    """The per-item decisions every executor shares: unique ids, skip, finish or redo from what the
    output holds, which chunks are left, which prompt, the error row of an item that cannot be chunked."""

    def __init__(self, job: CaptionJob, index: ResumeIndex | None, stats: Stats) -> None:
        self.job, self.index, self.stats = job, index, stats
        self._seen_ids = SeenIds()

    def unique(self, item: AudioItem) -> AudioItem:
        """Two inputs may yield the same id; the second gets a suffix and an error row."""
        count = self._seen_ids.add(item.id)
        if count == 0:
            return item
        reason = item.error or duplicate_reason(item.id, f"{item.path} and an earlier input")
        return duplicate_row(item, reason, f"{item.id}#{count}")

    def decide(self, item: AudioItem, source: Fingerprint | None) -> ItemDecision:
        """Skip, finish or redo the item, from what the output holds and the file now."""
        index = self.index
        if index is None or item.id not in index:
            version = 0 if index is None else (index.version(item.id) or 0)
            return ItemDecision(source, version, fresh=True)
        version, changed = index.source_version(item.id, source, self.job.content_hash)
        if changed:
            with self.stats.lock:
                self.stats.items_changed += 1
            return ItemDecision(source, version, fresh=True)
        decision = ItemDecision(source, version, fresh=False)
        if self.job.retry_failed and index.is_failed(item.id):
            return decision
        if self._keep_silence and index.silent_chunks(item.id):  # gated chunks, captioned now
            return decision
        decision.wanted = not index.is_done(item.id)
        if not decision.wanted and self.job.track_prompt is not None and index.track_missing(item.id):
            decision.wanted = decision.track_only = True
        return decision

    def done_chunks(self, item: AudioItem, decision: ItemDecision) -> set[int]:
        """Chunk indexes already on disk for this version (failed ones count as not done with --retry-failed)."""
        if decision.fresh or self.index is None:
            return set()
        done = self.index.done_chunks(item.id)
        if self.job.retry_failed:
            done -= self.index.failed_chunks(item.id)
        if self._keep_silence:
            done -= self.index.silent_chunks(item.id)
        return done

    @property
    def _keep_silence(self) -> bool:
        return self.job.gates is not None and self.job.gates.keep_silence

    def prompt(self, item: AudioItem) -> str:
        """The manifest row's own prompt where it has one (and row prompts are on), else the job's."""
        job = self.job
        return (item.prompt if job.use_row_prompts and item.prompt else None) or job.prompt

    def fail_item(self, sink: Any, item: AudioItem, reason: str, decision: ItemDecision) -> None:
        """The one error row of an item that failed before its chunks (missing file, decode error)."""
        begin = getattr(sink, "begin_item", None)
        if begin is not None:
            begin(item.id, decision.source, decision.version, 1)
        result = error_result(item, reason)
        sink.write(result)
        self.stats.add_result(result)
