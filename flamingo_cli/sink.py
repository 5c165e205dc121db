"""The output side: the one owner of the Parquet schema, the part files and the resume index.

Layout: ``OUT/run=<run_key>/part-<seq:06d>-<8 hex>.parquet`` (hive style, so
``pyarrow.dataset.dataset(OUT, partitioning="hive")`` exposes ``run`` as a column).

Exactly-once, crash-safe writing:

* a part is written to ``OUT/run=<key>/.tmp/<name>.tmp``, fsynced, ``os.replace``-d into place and the
  directory fsynced, so a reader never sees a half-written part (pyarrow, duckdb and pandas skip
  paths starting with ``.`` or ``_``); leftovers in ``.tmp`` from a crash are deleted on open;
* one ``Sink`` per run at a time: an exclusive ``flock`` on ``OUT/run=<key>/.lock`` makes a second
  one (say an overlapping cron job) fail with ``OutputError`` instead of writing duplicates;
* ``write()`` drops an (id, chunk_index) that is already on disk or already written by this sink.

Rows with ``num_chunks == 0`` mean "no chunks could be made" (decode error, missing file): one row
with ``chunk_index = 0``, null start/end/duration/caption and ``error`` set (see ``error_result``).
A chunk that failed keeps its real ``chunk_index``/``num_chunks`` and has ``error`` set.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flamingo_cli import __version__
from flamingo_cli.records import AudioItem, Chunk, Result

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("chunk_index", pa.int32()),
        ("num_chunks", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("model", pa.string()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("caption", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("error", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

METADATA_KEY = b"flamingo"
PART_SUFFIX = ".parquet"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
# Names a passthrough column may not take: the core columns and the hive partition column.
RESERVED_NAMES = frozenset([*SCHEMA.names, "run"])
_INDEX_COLUMNS = ["id", "chunk_index", "num_chunks", "error"]
_INDEX_SCHEMA = pa.schema([SCHEMA.field(c) for c in _INDEX_COLUMNS])
_PART_RE = re.compile(r"^part-(\d+)-[0-9a-f]+\.parquet$")
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class OutputError(Exception):
    """The output cannot be written or read; the message names the path and the reason."""


def run_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash (12 hex) of what makes a run: model, task, prompt, sampling params...

    Key order does not matter (json ``sort_keys``). The first character is forced to a letter
    (a-f) so that hive readers (pyarrow, duckdb) never infer the ``run`` column as a number.
    """
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return "abcdef"[int(digest[0], 16) % 6] + digest[1:]


def error_result(item: AudioItem, reason: str) -> Result:
    """A Result for an item that failed before chunking: one row with num_chunks = 0."""
    nan = float("nan")
    chunk = Chunk(item=item, index=0, num_chunks=0, start_s=nan, end_s=nan, samples=None, duration_s=nan, error=reason)
    return Result(chunk=chunk, prompt=item.prompt, error=reason)


def _describe_oserror(path: Path | str, action: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        reason = "disk quota exceeded"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    else:
        reason = exc.strerror or type(exc).__name__
    return f"{path}: cannot {action}: {reason} ({exc})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumeIndex:
    """What is already written for one run, built from the complete parts on disk.

    Built with Arrow group-bys, so memory is per item (not per row) for finished items: a million
    rows load in about a second. A (id, chunk_index) counts as written whether it holds a caption or
    an error. ``done_chunks`` lists real chunks only (rows with num_chunks > 0); an item with only a
    num_chunks = 0 error row is done with no chunks.
    """

    def __init__(self, table: pa.Table | None = None) -> None:
        if table is None:
            table = _INDEX_SCHEMA.empty_table()
        self._rows = table.num_rows
        valid = pc.and_(
            pc.and_(pc.is_valid(table["id"]), pc.is_valid(table["chunk_index"])),
            pc.is_valid(table["num_chunks"]),
        )
        t = table.filter(valid)
        real = t.filter(pc.greater(t["num_chunks"], 0))
        in_range = real.filter(
            pc.and_(pc.greater_equal(real["chunk_index"], 0), pc.less(real["chunk_index"], real["num_chunks"]))
        )
        groups = in_range.group_by("id").aggregate([("num_chunks", "max"), ("chunk_index", "count_distinct")])
        done_mask = pc.greater_equal(groups["chunk_index_count_distinct"], groups["num_chunks_max"])
        # id -> num_chunks of finished items; 0 for items with only a num_chunks = 0 error row.
        self._done: dict[str, int] = dict(
            zip(
                groups["id"].filter(done_mask).to_pylist(),
                groups["num_chunks_max"].filter(done_mask).to_pylist(),
                strict=True,
            )
        )
        done_ids = pa.array(list(self._done), type=pa.string())
        partial = real.filter(pc.invert(pc.is_in(real["id"], value_set=done_ids)))
        # id -> chunk indexes written, for items with some but not all chunks.
        self._partial: dict[str, set[int]] = {}
        for item_id, index in zip(partial["id"].to_pylist(), partial["chunk_index"].to_pylist(), strict=True):
            self._partial.setdefault(item_id, set()).add(index)
        real_ids = pc.unique(real["id"])
        zero = t.filter(pc.equal(t["num_chunks"], 0))
        zero = zero.filter(pc.invert(pc.is_in(zero["id"], value_set=real_ids)))
        for item_id in pc.unique(zero["id"]).to_pylist():
            self._done[item_id] = 0
        # Keys with an error row and no successful row (a retry may have fixed some).
        errors = t.filter(pc.is_valid(t["error"]))
        error_keys = set(zip(errors["id"].to_pylist(), errors["chunk_index"].to_pylist(), strict=True))
        ok = t.filter(pc.and_(pc.is_null(t["error"]), pc.is_in(t["id"], value_set=pc.unique(errors["id"]))))
        ok_keys = set(zip(ok["id"].to_pylist(), ok["chunk_index"].to_pylist(), strict=True))
        self._failed_keys = error_keys - ok_keys

    def is_done(self, item_id: str) -> bool:
        """All of the item's chunks are present (num_chunks rows), or it has a num_chunks=0 row."""
        return item_id in self._done

    def done_chunks(self, item_id: str) -> set[int]:
        """Chunk indexes already written, to finish a partially written item."""
        if item_id in self._partial:
            return set(self._partial[item_id])
        return set(range(self._done.get(item_id, 0)))

    def has_key(self, item_id: str, chunk_index: int) -> bool:
        """The (id, chunk_index) must not be written again; every chunk of a num_chunks=0 item."""
        n = self._done.get(item_id)
        if n is not None:
            return n == 0 or 0 <= chunk_index < n
        return chunk_index in self._partial.get(item_id, ())

    def zero_chunk_only(self, item_id: str) -> bool:
        """The item's only rows are num_chunks = 0 error rows."""
        return self._done.get(item_id) == 0

    def failed_items(self) -> set[str]:
        """Items with an error row not superseded by a successful row (for --retry-failed)."""
        return {item_id for item_id, _ in self._failed_keys}

    def failed_keys(self) -> set[tuple[str, int]]:
        """(id, chunk_index) pairs whose only rows are errors."""
        return set(self._failed_keys)

    def __len__(self) -> int:
        return self._rows

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._done or item_id in self._partial


# --- passthrough columns -------------------------------------------------------------------------


def _scalar_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, int | np.integer):
        return "int" if -(2**63) <= int(value) < 2**63 else "json"
    if isinstance(value, float | np.floating):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _to_json(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=_json_default)
    except TypeError:  # dict keys of mixed types cannot be sorted
        return json.dumps(value, ensure_ascii=False, default=_json_default)


def _passthrough_names(keys: list[str]) -> dict[str, str]:
    """Map manifest keys to column names; a key named like a core column becomes ``extra_<key>``."""
    mapping = {k: k for k in keys if k not in RESERVED_NAMES}
    used = set(RESERVED_NAMES) | set(keys)
    for k in keys:
        if k in RESERVED_NAMES:
            name = f"extra_{k}"
            while name in used:
                name = f"extra_{name}"
            mapping[k] = name
            used.add(name)
    return mapping


def _passthrough_array(values: list[Any]) -> pa.Array:
    """One passthrough column of a part, typed so that parts stay readable together.

    str -> string, bool -> bool, int -> int64, float -> float64, ints mixed with floats -> float64;
    any other mix, and any other value (list, dict, ...), -> string, non-str values as JSON. A column
    that is null in every row of the part is a null string column.
    """
    kinds = {k for k in map(_scalar_kind, values) if k is not None}
    if not kinds or kinds == {"str"}:
        return pa.array(values, type=pa.string())
    if kinds == {"bool"}:
        return pa.array([None if v is None else bool(v) for v in values], type=pa.bool_())
    if kinds == {"int"}:
        return pa.array([None if v is None else int(v) for v in values], type=pa.int64())
    if kinds <= {"int", "float"}:
        return pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    return pa.array([v if v is None or isinstance(v, str) else _to_json(v) for v in values], type=pa.string())


def _null_if_nan(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _opt_int(x: int | None) -> int | None:
    return None if x is None else int(x)


# --- the sink ------------------------------------------------------------------------------------


class Sink:
    """Buffers Results and writes them as atomic Parquet parts of one run.

    ``write()`` flushes a part when ``rows_per_part`` rows are buffered or ``flush_seconds`` have
    passed since the first buffered row (checked on ``write`` and ``flush_if_due``). A failed flush
    (disk full, ...) removes its temp file, keeps the rows buffered for a later retry and raises
    ``OutputError``.

    Passthrough columns (``AudioItem.extra``) follow the core columns. Their type is inferred per
    part (see ``_passthrough_array``): str stays string, bool bool, int int64, float float64 (ints
    mixed with floats too), anything else or any other mix becomes a string column with JSON for
    non-str values. A column missing in some rows of a part is null there. Types of one column can
    still differ between parts (a column all int in one part, mixed in another); read the dataset
    with a unified schema (``pa.unify_schemas(..., promote_options="permissive")``) if needed.

    ``retry_failed=True`` lets this sink write again (once) the (id, chunk_index) keys whose only
    rows on disk are errors; the old error rows stay, so readers should prefer a non-error row per
    (run, id, chunk_index). ``ResumeIndex.failed_items`` then drops the items that succeeded.

    ``lock=False`` skips the run lock; only for tests or callers holding their own lock, since
    opening also deletes leftover temp parts, which a concurrent writer may still be writing.
    ``clock`` is injectable for tests of ``flush_seconds``.
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
    ) -> None:
        if not _RUN_KEY_RE.match(run_key):
            raise ValueError(f"run_key {run_key!r} is not a safe directory name")
        if rows_per_part < 1:
            raise ValueError("rows_per_part must be >= 1")
        self.out_dir = Path(out_dir)
        self.run_key = run_key
        self.run_dir = self.out_dir / f"run={run_key}"
        self.tmp_dir = self.run_dir / TMP_DIR
        self.model = model
        self.task = task
        self.rows_per_part = rows_per_part
        self.flush_seconds = flush_seconds
        self.retry_failed = retry_failed
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
        self._seeded = False
        self._closed = False
        self._lock = threading.RLock()
        self._lock_fd: int | None = None

        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(_describe_oserror(self.tmp_dir, "create output directory", exc)) from exc
        if lock:
            self._acquire_lock()
        try:
            if check_writable:
                self._probe(self.run_dir)
                self._probe(self.tmp_dir)
            self._clean_tmp()
            self._next_seq = self._max_seq() + 1
        except BaseException:
            self._release_lock()
            raise

    # -- setup ------------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(_describe_oserror(path, "create lock file", exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"{self.run_dir}: another flamingo process is writing this run (lock {path} is held)"
                ) from exc
            raise OutputError(_describe_oserror(path, "lock", exc)) from exc
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _probe(directory: Path) -> None:
        probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise OutputError(_describe_oserror(directory, "write", exc)) from exc

    def _clean_tmp(self) -> None:
        """Delete temp parts a crashed writer left (safe: we hold the run's lock)."""
        try:
            for entry in self.tmp_dir.iterdir():
                if entry.is_file():
                    entry.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(_describe_oserror(self.tmp_dir, "clean leftover temp files", exc)) from exc

    def part_files(self) -> list[Path]:
        """The complete parts of this run, in sequence order."""
        try:
            names = [e.name for e in os.scandir(self.run_dir) if e.is_file() and _PART_RE.match(e.name)]
        except OSError as exc:
            raise OutputError(_describe_oserror(self.run_dir, "list", exc)) from exc
        return [self.run_dir / n for n in sorted(names)]

    def _max_seq(self) -> int:
        seqs = [int(m.group(1)) for p in self.part_files() if (m := _PART_RE.match(p.name))]
        return max(seqs, default=-1)

    # -- resume -----------------------------------------------------------------------------------

    def load_index(self) -> ResumeIndex:
        """Read id, chunk_index, num_chunks, error of this run's complete parts (buffered rows excluded)."""
        files = self.part_files()
        if files:
            try:
                dataset = ds.dataset([str(f) for f in files], schema=_INDEX_SCHEMA, format="parquet")
                table = dataset.to_table(columns=_INDEX_COLUMNS)
            except (OSError, pa.ArrowException) as exc:
                raise OutputError(f"{self.run_dir}: cannot read existing parts for resume: {exc}") from exc
            index = ResumeIndex(table)
        else:
            index = ResumeIndex()
        with self._lock:
            if not self._seeded:
                self._seed(index)
        return index

    def _seed(self, index: ResumeIndex) -> None:
        self._index = index
        if self.retry_failed:
            self._retry_keys = index.failed_keys()
            self._retry_ids = {i for i, _ in self._retry_keys if index.zero_chunk_only(i)}
        self._seeded = True

    def _is_duplicate(self, key: tuple[str, int]) -> bool:
        if key in self._seen:
            return True
        if not self._index.has_key(*key):
            return False
        return not (self.retry_failed and (key in self._retry_keys or key[0] in self._retry_ids))

    # -- writing ----------------------------------------------------------------------------------

    def _row(self, result: Result) -> dict[str, Any]:
        chunk = result.chunk
        item = chunk.item
        return {
            "id": str(item.id),
            "path": str(item.path),
            "chunk_index": int(chunk.index),
            "num_chunks": int(chunk.num_chunks),
            "start_s": _null_if_nan(chunk.start_s),
            "end_s": _null_if_nan(chunk.end_s),
            "duration_s": _null_if_nan(chunk.duration_s),
            "model": self.model,
            "task": self.task,
            "prompt": result.prompt,
            "caption": result.caption,
            "finish_reason": result.finish_reason,
            "prompt_tokens": _opt_int(result.prompt_tokens),
            "output_tokens": _opt_int(result.output_tokens),
            "error": result.error if result.error is not None else chunk.error,
            "created_at": datetime.now(UTC),
        }

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
            if self._is_duplicate(key):
                self.duplicates_dropped += 1
                return
            self._seen.add(key)
            self._buffer.append((self._row(result), result.chunk.item.extra))
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
        rows = [r for r, _ in self._buffer]
        arrays = [pa.array([r[f.name] for r in rows], type=f.type) for f in SCHEMA]
        fields = list(SCHEMA)
        keys: list[str] = []
        seen_keys: set[str] = set()
        extras = [{str(k): v for k, v in extra.items()} for _, extra in self._buffer]
        for extra in extras:
            for k in extra:
                if k not in seen_keys:
                    seen_keys.add(k)
                    keys.append(k)
        names = _passthrough_names(keys)
        for k in keys:
            array = _passthrough_array([extra.get(k) for extra in extras])
            arrays.append(array)
            fields.append(pa.field(names[k], array.type))
        schema = pa.schema(
            fields,
            metadata={METADATA_KEY: json.dumps(self.run_info, sort_keys=True, default=str).encode("utf-8")},
        )
        return pa.Table.from_arrays(arrays, schema=schema)

    def flush(self) -> None:
        """Write the buffered rows as one atomic part; no-op if empty."""
        with self._lock:
            if not self._buffer:
                return
            table = self._table()
            name = f"part-{self._next_seq:06d}-{secrets.token_hex(4)}{PART_SUFFIX}"
            tmp = self.tmp_dir / f"{name}.tmp"
            final = self.run_dir / name
            try:
                pq.write_table(table, str(tmp), compression="zstd")
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                raise OutputError(_describe_oserror(final, "write part", exc)) from exc
            # The part is in place from here on: account for it even if the directory fsync fails.
            self._next_seq += 1
            self.rows_written += len(self._buffer)
            self.parts_written += 1
            self._buffer.clear()
            self._first_buffered_at = None
            try:
                _fsync_dir(self.run_dir)
            except OSError as exc:
                raise OutputError(_describe_oserror(self.run_dir, "fsync directory", exc)) from exc

    def close(self) -> None:
        """Flush and release the run lock; idempotent. If the flush fails, the sink stays open."""
        with self._lock:
            if self._closed:
                return
            self.flush()
            self._closed = True
            self._release_lock()

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Finished rows are valid even when the pipeline failed: flush them.
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release_lock()


def read_metadata(part: str | Path) -> dict[str, Any]:
    """The ``flamingo`` key-value metadata of one part file."""
    meta = pq.read_schema(part).metadata or {}
    return json.loads(meta[METADATA_KEY])
