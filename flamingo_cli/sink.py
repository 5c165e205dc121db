"""The sink: buffers Results as rows, once per (id, chunk_index), into the parts of one run.

The row adapter (``Result`` -> one row of ``output.layout.SCHEMA``), the buffer (a part every
``rows_per_part`` rows or ``flush_seconds``), and the exactly-once filter (a key already on disk,
per ``resume.ResumeIndex``, or already written by this sink is dropped). Parts go through one
``output.writers.PartWriter`` (the run lock, the atomic commit of a part: local folder or object
store), their passthrough columns through ``output.columns.RunColumns``.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa

from flamingo_cli import __version__, gates, quality, resume, timestamps
from flamingo_cli.errors import OutputError
from flamingo_cli.output.columns import COLUMN_TYPES, RunColumns
from flamingo_cli.output.layout import METADATA_KEY, RESERVED_NAMES, RUN_KEY_RE, SCHEMA, first_part_schema
from flamingo_cli.output.writers import open_writer
from flamingo_cli.paths import escape_path, path_bytes
from flamingo_cli.records import TRACK_INDEX, Fingerprint, Result
from flamingo_cli.resume import ResumeIndex


def _escaped(text: str | None) -> str | None:
    """Messages may quote a path that is not UTF-8 (AudioDecodeError); Parquet strings must be UTF-8."""
    return None if text is None else escape_path(text)


def _null_if_nan(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _opt_int(x: int | None) -> int | None:
    return None if x is None else int(x)


def _segments_columns(result: Result) -> dict[str, Any]:
    """``level`` and ``segments`` (issue 26): the caption's timestamps in the source file's time (the
    item's offset plus the chunk's start; a track row's times are already the item's)."""
    chunk = result.chunk
    level = "track" if chunk.index == TRACK_INDEX else "chunk"
    if result.error is not None or chunk.error is not None or result.caption is None:
        return {"level": level, "segments": None}
    base = float(chunk.item.offset or 0.0) + (0.0 if math.isnan(chunk.start_s) else chunk.start_s)
    end = None if math.isnan(chunk.end_s) else float(chunk.item.offset or 0.0) + chunk.end_s
    return {"level": level, "segments": timestamps.segments(result.caption, base, end)}


def _confidence(result: Result) -> dict[str, Any]:
    """The confidence columns (issue 25b) of one row: flags as the result carries them (``fallback.Ladder``
    judged it), else by the default rules; null on error rows."""
    chunk = result.chunk
    asked = chunk.error is None and chunk.num_chunks > 0  # the row went to the engine
    if result.gate == "silence":  # the silence gate's row: no caption to judge, no request made
        asked = False
    failed = result.error is not None or not asked
    flags = None if failed else (result.flags if result.flags is not None else quality.flags_for(result))
    attempts = int(result.attempts) if asked else None
    if result.gate == "duplicate":  # it carries its original's caption and flags; it made no request
        attempts = 0
    return {
        "avg_logprob": None if failed else _null_if_nan(result.avg_logprob),
        "compression_ratio": quality.compression_ratio(result.caption),
        "flags": None if flags is None else list(flags),
        "attempts": attempts,
    }


class Sink:
    """Buffers Results and writes them as exactly-once Parquet parts of one run.

    ``write()`` flushes a part when ``rows_per_part`` rows are buffered or ``flush_seconds`` have
    passed since the first buffered row (checked on ``write`` and ``flush_if_due``). A failed flush
    (disk full, ...) removes its temp file, keeps the rows buffered for a later retry and raises
    ``OutputError``.

    One schema per run: passthrough columns (``AudioItem.extra``) follow the core columns with the
    same names and types in every part. They are fixed before the first part: by the run's first
    part if there is one (a resume), else by ``columns`` ({manifest key: string|int64|float64|bool},
    see ``manifests.declared_columns``), else by the rows of the first part (str -> string, bool ->
    bool, int -> int64, ints with floats -> float64, any other mix or value -> string, JSON for
    non-strings). A row missing a column has null there; a value that does not fit the column's
    type, or a key outside the schema, is stored null / dropped and named in the row's ``warnings``.
    String columns take any value (non-strings as JSON text).

    ``retry_failed=True`` lets this sink write again (once) the (id, chunk_index) keys whose only
    rows on disk are errors; the old error rows stay, so readers take the latest row per
    (run, id, chunk_index) (``current_rows``). ``ResumeIndex.failed_items`` then drops the items that
    succeeded.

    ``begin_item(id, source, version, rows)`` tells the sink the source fingerprint and
    source_version to record on the item's next ``rows`` rows; a version above the one on disk
    (the file changed) lets the item's keys be written again. Items never begun are written with a
    null fingerprint under their version on disk (0 for new items).

    ``out_dir`` is a local folder or an ``s3://bucket/prefix`` URL (see "Object stores" in
    ``output.writers``); ``lease_seconds`` is the object-store lease's lifetime (renewed every third of
    it while the sink is open; default from ``FLAMINGO_LEASE_SECONDS`` or 60).

    ``lock=False`` skips the run lock; only for tests or callers holding their own lock, since
    opening also deletes leftover temp parts, which a concurrent writer may still be writing.
    ``clock`` is injectable for tests of ``flush_seconds``.

    ``extra_fields`` are run-specific columns declared up front (a ``--schema`` run's ``caption_json``
    and ``f_*``, see flamingo_cli/schema.py), written after the core columns in every part with exactly
    these types; ``extra_values(result)`` gives a row's values for them (missing names are null).
    """

    def __init__(
        self,
        out_dir: str | Path,
        run_key: str,
        run_info: Mapping[str, Any],
        model: str,
        task: str,
        rows_per_part: int = 1000,
        flush_seconds: float = 30.0,
        check_writable: bool = True,
        *,
        retry_failed: bool = False,
        lock: bool = True,
        clock: Callable[[], float] = time.monotonic,
        shard: tuple[int, int] | None = None,
        columns: Mapping[str, str] | None = None,
        lease_seconds: float | None = None,
        extra_fields: Sequence[pa.Field] = (),
        extra_values: Callable[[Result], Mapping[str, Any]] | None = None,
        keep_silence: bool = False,
    ) -> None:
        if not RUN_KEY_RE.match(run_key):
            raise ValueError(f"run_key {run_key!r} is not a safe directory name")
        if rows_per_part < 1:
            raise ValueError("rows_per_part must be >= 1")
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard {shard!r} is not (index, count) with 0 <= index < count")
        for k, t in (columns or {}).items():
            if t not in COLUMN_TYPES:
                raise ValueError(f"column {k!r}: type {t!r} is not one of {', '.join(COLUMN_TYPES)}")
        clash = [f.name for f in extra_fields if f.name in RESERVED_NAMES]
        if clash:
            raise ValueError(f"extra columns {clash} clash with core columns")
        # The run's own columns (a --schema run's caption_json and f_*), right after the core ones;
        # passthrough columns may not take their names.
        self.extra_fields = list(extra_fields)
        self._extra_values = extra_values
        extra_names = frozenset(f.name for f in self.extra_fields)
        self.run_key = run_key
        self.shard = shard if shard is not None and shard[1] > 1 else None
        self.model = model
        self.task = task
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.retry_failed = retry_failed
        self.keep_silence = keep_silence  # silence-gated rows on disk may be written again (captioned)
        self._clock = clock
        meta = dict(run_info)
        meta["run_key"] = run_key
        meta["flamingo_version"] = __version__
        meta.setdefault("model", model)
        meta.setdefault("task", task)
        # Written into every part's key-value metadata; callers may add to it (engine versions, the
        # effective sampling) once the model has loaded.
        self.run_info: dict[str, Any] = meta
        self.rows_written = 0
        self.parts_written = 0
        self.duplicates_dropped = 0
        self._buffer: list[tuple[dict[str, Any], Mapping[str, Any]]] = []
        self._first_buffered_at: float | None = None
        # Keys written (or buffered) by this sink; the index holds what was on disk at open.
        self._seen: set[tuple[str, int]] = set()
        self._index = ResumeIndex()
        self._retry_keys: set[tuple[str, int]] = set()
        self._retry_ids: set[str] = set()
        self._redo_keys: set[tuple[str, int]] = set()  # gates: silence-gated keys, with keep_silence
        # id -> [fingerprint, source_version, rows still to come], from begin_item().
        self._sources: dict[str, list[Any]] = {}
        self._seeded = False
        self._closed = False
        self._lock = threading.RLock()
        # A sources.ScanStats the caller attaches; close() records its counts (local outputs).
        self.scan: Any = None
        # The run's passthrough columns: decided below, or by the first part's rows.
        self._columns = RunColumns(RESERVED_NAMES | extra_names, extra_names)
        self._writer = open_writer(
            out_dir, run_key, shard=self.shard, lock=lock, check_writable=check_writable, lease_seconds=lease_seconds
        )
        self.out_dir = self._writer.out_dir
        self.run_dir = self._writer.run_dir
        try:
            self._decide_schema(columns)
        except BaseException:
            self._writer.close()
            raise

    # -- the run's schema -------------------------------------------------------------------------

    def _decide_schema(self, declared: Mapping[str, str] | None) -> None:
        """Fix the passthrough columns: the first part's, else the declared ones (else at first flush)."""
        first = first_part_schema(self.out_dir, self.run_key)
        if first is not None:
            try:
                recorded = json.loads((first.metadata or {})[METADATA_KEY]).get("passthrough") or {}
            except (KeyError, ValueError, AttributeError):
                recorded = {}
            self._columns.from_part(first, SCHEMA.names, recorded)
        elif declared:
            self._columns.declare(declared)
        self._record_fields()

    def _record_fields(self) -> None:
        """Put the column -> manifest key mapping in the parts' metadata (a resume reads it back)."""
        mapping = self._columns.mapping()
        if mapping is not None:
            self.run_info["passthrough"] = mapping

    @property
    def columns(self) -> dict[str, str] | None:
        """The run's passthrough columns {column name: Arrow type name}; None until decided."""
        return self._columns.types()

    # -- resume -----------------------------------------------------------------------------------

    def load_index(self) -> ResumeIndex:
        """The resume index of this run's complete parts (buffered rows excluded); seeds the dedupe."""
        index = resume.load_index(self.out_dir, self.run_key)
        with self._lock:
            if not self._seeded:
                self._seed(index)
        return index

    def _seed(self, index: ResumeIndex) -> None:
        self._index = index
        if self.retry_failed:
            self._retry_keys = index.failed_keys()
            self._retry_ids = {i for i, _ in self._retry_keys if index.zero_chunk_only(i)}
        if self.keep_silence:
            self._redo_keys = index.silent_keys()
        self._seeded = True

    def begin_item(self, item_id: str, source: Fingerprint | None, version: int, rows: int) -> None:
        """Record ``source`` and ``version`` on the next ``rows`` rows written for ``item_id``."""
        if rows <= 0:
            return
        with self._lock:
            self._sources[str(item_id)] = [source, int(version), int(rows)]

    def _source_of(self, item_id: str) -> tuple[Fingerprint | None, int]:
        entry = self._sources.get(item_id)
        if entry is not None:
            return entry[0], entry[1]
        return None, self._index.version(item_id) or 0

    def _is_duplicate(self, key: tuple[str, int], version: int) -> bool:
        if key in self._seen:
            return True
        if not self._index.has_key(*key):
            return False
        on_disk = self._index.version(key[0])
        if version > (on_disk or 0):  # the source changed: a new version of the item supersedes
            return False
        if key in self._redo_keys:  # a silence-gated row, captioned now (--keep-silence)
            self._redo_keys.discard(key)
            return False
        return not (self.retry_failed and (key in self._retry_keys or key[0] in self._retry_ids))

    # -- writing ----------------------------------------------------------------------------------

    def _row(self, result: Result, source: Fingerprint | None, version: int) -> dict[str, Any]:
        row = self._core_row(result, source, version)
        if self.extra_fields:
            values = self._extra_values(result) if self._extra_values is not None else {}
            row.update({f.name: values.get(f.name) for f in self.extra_fields})
        return row

    def _core_row(self, result: Result, source: Fingerprint | None, version: int) -> dict[str, Any]:
        chunk = result.chunk
        item = chunk.item
        return {
            "id": escape_path(str(item.id)),
            "path": escape_path(str(item.path)),
            "chunk_index": int(chunk.index),
            "num_chunks": int(chunk.num_chunks),
            "start_s": _null_if_nan(chunk.start_s),
            "end_s": _null_if_nan(chunk.end_s),
            "duration_s": _null_if_nan(chunk.duration_s),
            "model": self.model,
            "task": self.task,
            "prompt": result.prompt,
            "caption": result.caption,
            "reasoning": result.reasoning,
            "finish_reason": result.finish_reason,
            "prompt_tokens": _opt_int(result.prompt_tokens),
            "output_tokens": _opt_int(result.output_tokens),
            "error": _escaped(result.error if result.error is not None else chunk.error),
            "created_at": datetime.now(UTC),
            "source_size": None if source is None else source.size,
            "source_mtime_ns": None if source is None else source.mtime_ns,
            "source_sha256": None if source is None else source.sha256,
            "source_version": version,
            "path_bytes": path_bytes(str(item.path)),
            **self._gate_values(result),
            **_segments_columns(result),
            **_confidence(result),
        }

    @staticmethod
    def _gate_values(result: Result) -> dict[str, Any]:
        values = gates.row_values(result)
        values["duplicate_of"] = _escaped(values["duplicate_of"])
        return values

    def write(self, result: Result) -> None:
        """Buffer one row; drop it if its (id, chunk_index) is already written. May flush a part.

        If that flush fails the row stays buffered and OutputError is raised.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("write() on a closed Sink")
            if not self._seeded:
                self.load_index()
            key = (str(result.chunk.item.id), int(result.chunk.index))
            source, version = self._source_of(key[0])
            entry = self._sources.get(key[0])
            if entry is not None:
                entry[2] -= 1
                if entry[2] <= 0:
                    del self._sources[key[0]]
            if self._is_duplicate(key, version):
                self.duplicates_dropped += 1
                return
            self._seen.add(key)
            self._buffer.append((self._row(result, source, version), result.chunk.item.extra))
            if self._first_buffered_at is None:
                self._first_buffered_at = self._clock()
            if len(self._buffer) >= self.rows_per_part:
                self.flush()
            else:
                self.flush_if_due()

    def flush_if_due(self) -> None:
        """Flush if flush_seconds passed since the first buffered row (call it when results stall)."""
        with self._lock:
            if self._first_buffered_at is not None and (self._clock() - self._first_buffered_at >= self.flush_seconds):
                self.flush()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _table(self) -> pa.Table:
        """The buffered rows as one part with the run's schema (decided here if still open)."""
        extras = [{str(k): v for k, v in extra.items()} for _, extra in self._buffer]
        fields, arrays, warnings = self._columns.cells(extras)
        self._record_fields()
        rows = [r for r, _ in self._buffer]
        for r, w in zip(rows, warnings, strict=True):
            r["warnings"] = "; ".join(w) if w else None
        core = [*SCHEMA, *self.extra_fields]
        schema = pa.schema(
            [*core, *fields],
            metadata={METADATA_KEY: json.dumps(self.run_info, sort_keys=True, default=str).encode("utf-8")},
        )
        return pa.Table.from_arrays(
            [pa.array([r[f.name] for r in rows], type=f.type) for f in core] + arrays, schema=schema
        )

    def _account(self) -> None:
        self.rows_written += len(self._buffer)
        self.parts_written += 1
        self._buffer.clear()
        self._first_buffered_at = None

    def flush(self) -> None:
        """Write the buffered rows as one atomic part; no-op if empty."""
        with self._lock:
            if self._buffer:
                self._writer.commit(self._table(), self._account)

    def close(self) -> None:
        """Flush and release the run lock; idempotent. If the flush fails, the sink stays open."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            try:
                self._write_scan()
            finally:
                self._writer.close()

    def _write_scan(self) -> None:
        """Record the attached scan's skipped-file counts (best effort: the summary has them too).

        Only a scan that read every input (an interrupted one would replace complete counts with partial
        ones).
        """
        scan = self.scan
        if scan is None or not scan.finished:
            return
        self._writer.record_scan(
            {
                "skipped": scan.skipped(),
                "skipped_total": scan.total,
                "complete": True,
                "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Finished rows are valid even when the pipeline failed: flush them. If that fails too (the
        # disk is still full), the first error is the one to report; the rows are redone on resume.
        if exc is None:
            self.close()
            return
        with contextlib.suppress(OutputError):
            self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
