"""The counts of one run: every number the display, the log lines and the summary show.

Read from the executor's ``planner.Stats``, from the results on their way to the sink (``Watched``
counts finished files and notes when rows arrive), from the input walk (files found so far, the total
once it has finished) and from the folder scans' ``sources.ScanStats`` (files passed over). Counting
only: no drawing, no I/O.

The moments (``time.monotonic()``) the summary's timings come from are taken where they happen: the
engine ready (``Tally.engine_ready``, set by the run when its engine is started, injected or not
needed), the first row the sink accepted and the last result the engine produced (``Watched``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flamingo_cli.quality import FLAGS


class Watched:
    """The sink the executor writes to: delegates everything, and counts finished items on the way.

    An item is finished when rows for all the chunks the executor planned for it are written (a chunk
    error counts). The executor announces that number with ``begin_item`` (passed on to the sink);
    without it, chunks already in the resume index are subtracted from ``num_chunks``.

    ``first_row_at``: when the sink accepted its first row (any row); ``last_result_at``: when it
    accepted the last row the engine produced (not an error row written before the engine).
    """

    def __init__(self, sink: Any, index: Any = None, retry_failed: bool = False) -> None:
        self.sink = sink
        self.index = index
        self.retry_failed = retry_failed
        self._lock = threading.Lock()
        self._expected: dict[str, int] = {}
        self._got: dict[str, int] = {}
        self._had_error: set[str] = set()
        self.items_ok = 0
        self.items_with_errors = 0  # finished items with at least one chunk error
        self.chunk_errors_early = 0  # chunks failed before the engine (too short)
        self.first_row_at: float | None = None
        self.last_result_at: float | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "sink":
            raise AttributeError(name)
        return getattr(self.sink, name)

    def begin_item(self, item_id: str, *args: Any, **task: Any) -> None:
        """``task``: a several-task run's ``task=i`` (``pipeline.TaskRouter``): each task announces its
        rows of the item, and the item is finished when every task's are written."""
        rows = int(args[-1]) if args else 0
        inner = getattr(self.sink, "begin_item", None)
        if inner is not None:
            inner(item_id, *args, **task)
        with self._lock:
            before = self._expected.get(str(item_id), 0) if task.get("task") else 0
            self._expected[str(item_id)] = before + rows

    def _planned(self, item_id: str, num_chunks: int) -> int:
        expected = self._expected.get(item_id)
        if expected is not None:
            return expected
        if self.index is None or item_id not in self.index:
            return num_chunks
        done = set(self.index.done_chunks(item_id))
        if self.retry_failed and hasattr(self.index, "failed_chunks"):
            done -= set(self.index.failed_chunks(item_id))
        return num_chunks - len(done)

    def write(self, result: Any) -> None:
        self.sink.write(result)
        now = time.monotonic()
        chunk = result.chunk
        item_id = str(chunk.item.id)
        with self._lock:
            if self.first_row_at is None:
                self.first_row_at = now
            if chunk.num_chunks <= 0:  # an item that failed before chunking: Stats counts it
                self._expected.pop(item_id, None)
                return
            if chunk.error is not None:
                self.chunk_errors_early += 1
            elif getattr(result, "gate", None) is None:  # the engine's answer (a caption or its error)
                self.last_result_at = now
            got = self._got.get(item_id, 0) + 1
            if result.error is not None:
                self._had_error.add(item_id)
            if got >= self._planned(item_id, chunk.num_chunks):
                self._got.pop(item_id, None)
                self._expected.pop(item_id, None)
                if item_id in self._had_error:
                    self._had_error.discard(item_id)
                    self.items_with_errors += 1
                else:
                    self.items_ok += 1
            else:
                self._got[item_id] = got

    @property
    def items_finished(self) -> int:
        return self.items_ok + self.items_with_errors


class Tally:
    """What one run has counted so far; ``snapshot()`` turns it into the numbers (None = not known yet).

    ``stats``: the executor's counters; ``watched``: the counting sink (``watch``); ``walk``: the input
    walk (``found``, and ``total`` once it has finished); ``scan``: the files folder scans passed over;
    ``engine_ready``: when the run's engine was ready (after its start), None while it is not.
    """

    def __init__(self, stats: Any = None, walk: Any = None, scan: Any = None) -> None:
        self.stats, self.walk, self.scan = stats, walk, scan
        self.watched: Watched | None = None
        self.engine_ready: float | None = None

    def generation_s(self) -> float:
        """Seconds from the engine being ready to the last result it produced; 0.0 when it produced none."""
        last = self.watched.last_result_at if self.watched is not None else None
        if self.engine_ready is None or last is None:
            return 0.0
        return max(0.0, last - self.engine_ready)

    def watch(self, sink: Any, index: Any = None, retry_failed: bool = False) -> Watched:
        """Wrap the sink the executor writes to, so finished files can be counted."""
        self.watched = Watched(sink, index, retry_failed)
        return self.watched

    def snapshot(self) -> dict[str, Any]:
        s = self.stats.snapshot() if self.stats is not None else {}
        g = s.get
        now = time.monotonic()
        elapsed = max(1e-9, now - g("started", now))
        w, walk = self.watched, self.walk
        exhausted = bool(g("sources_exhausted", False))
        early = w.chunk_errors_early if w else 0
        skipped, failed_before = g("items_skipped", 0), g("items_failed", 0)
        finished = w.items_finished if w else 0
        files_total = g("items_seen", 0) if exhausted else (walk.total if walk is not None else None)
        files_done = skipped + failed_before + finished
        if exhausted and w is None:  # no watched sink: the best count is "read"
            files_done = g("items_seen", 0)
        audio_done = g("audio_s_done", 0.0)
        audio_total = g("audio_s_queued", 0.0) if exhausted else None
        rate = audio_done / elapsed
        eta: float | None = None
        if exhausted and audio_total is not None:
            eta = max(0.0, audio_total - audio_done) / rate if rate > 0 else (0.0 if audio_total <= 0 else None)
        elif files_total is not None and files_done - skipped > 0:
            eta = max(0, files_total - files_done) * elapsed / (files_done - skipped)
        return {
            "files_seen": g("items_seen", 0),
            "files_found": walk.found if walk is not None else None,  # by the walk so far
            "files_done": files_done,
            "files_total": files_total,
            "files_skipped": skipped,
            "files_ok": w.items_ok if w else None,
            "files_failed": failed_before + (w.items_with_errors if w else 0),
            "chunks_done": g("chunks_done", 0) + g("chunks_failed", 0),
            "chunks_ok": g("chunks_done", 0),
            "chunks_failed": g("chunks_failed", 0),
            "chunks_dropped": g("chunks_dropped", 0),
            "files_changed": g("items_changed", 0),
            "chunks_silent": g("chunks_silent", 0),  # gates: written without an engine request
            "chunks_duplicate": g("chunks_duplicate", 0),
            "requests_sent": g("requests_sent", 0),
            "chunks_total": g("chunks_queued", 0) + early if exhausted else None,
            "audio_s_done": audio_done,
            "audio_s_total": audio_total,
            "windows_done": g("windows_done", 0),
            "prompt_tokens": g("prompt_tokens", 0),
            "output_tokens": g("output_tokens", 0),
            "x_realtime": rate,
            "windows_per_s": g("windows_done", 0) / elapsed,
            "elapsed_s": elapsed,
            "eta_s": eta,
            "errors": failed_before + g("chunks_failed", 0),
            "passed_over_by_ext": self.scan.skipped() if self.scan is not None else {},
            # confidence (issue 25b): rows written with flags, per reason (every reason, 0 included);
            # --fallback's chunks asked again, re-asks made, chunks whose kept attempt is clean
            "rows_flagged": g("rows_flagged", 0),
            "flags": {name: (g("flags") or {}).get(name, 0) for name in FLAGS},
            "fallback": {
                "chunks": g("fallback_chunks", 0),
                "attempts": g("fallback_attempts", 0),
                "recovered": g("fallback_recovered", 0),
            },
        }
