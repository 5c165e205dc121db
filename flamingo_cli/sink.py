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

Changed sources and the latest-row rule (incremental / cron runs):

* every row records what its source file looked like when it was captioned: ``source_size``,
  ``source_mtime_ns`` (``os.stat``) and, with ``--hash``, ``source_sha256``; null when the file
  could not be read (missing file, bad manifest row);
* an item whose file changed since (see ``sources.source_changed``) is captioned again under the
  next ``source_version`` (0 the first time). Parts are never rewritten, so the old rows stay;
* readers take, per (run, id), only the rows of the highest ``source_version`` and, among those, per
  chunk_index the latest ``created_at`` (only ``--retry-failed`` writes a key twice within one
  version: an error row, then the retry's row). ``current_rows()`` does exactly that with pyarrow;
  ``ResumeIndex`` reads the same way. A run without changed files and without ``--retry-failed``
  holds every (id, chunk_index) exactly once, so plain reads need no filtering.

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
from flamingo_cli.errors import LockedError, OutputError
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sources import Fingerprint

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
        # Think models: the text inside <think> … </think> (null for other models and for errors).
        ("reasoning", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("output_tokens", pa.int32()),
        ("error", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        # What the source file looked like when captioned (null: it could not be read), and which
        # captioning of the item this row belongs to; see "Changed sources" above.
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
        ("source_sha256", pa.string()),
        ("source_version", pa.int32()),
    ]
)

METADATA_KEY = b"flamingo"
PART_SUFFIX = ".parquet"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
# Names a passthrough column may not take: the core columns and the hive partition column.
RESERVED_NAMES = frozenset([*SCHEMA.names, "run"])
_INDEX_COLUMNS = [
    "id",
    "chunk_index",
    "num_chunks",
    "error",
    "source_size",
    "source_mtime_ns",
    "source_sha256",
    "source_version",
]
_INDEX_SCHEMA = pa.schema([SCHEMA.field(c) for c in _INDEX_COLUMNS])
_PART_RE = re.compile(r"^part-(\d+)-[0-9a-f]+\.parquet$")
_RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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
    rows load in about a second. Only each item's latest ``source_version`` counts (older versions
    were superseded because the file changed). A (id, chunk_index) counts as written whether it
    holds a caption or an error. ``done_chunks`` lists real chunks only (rows with num_chunks > 0);
    an item with only a num_chunks = 0 error row is done with no chunks.
    """

    def __init__(self, table: pa.Table | None = None) -> None:
        if table is None:
            table = _INDEX_SCHEMA.empty_table()
        for name in _INDEX_COLUMNS:  # tables from before a column existed, or hand-made ones
            if name not in table.column_names:
                f = _INDEX_SCHEMA.field(name)
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        self._rows = table.num_rows
        valid = pc.and_(
            pc.and_(pc.is_valid(table["id"]), pc.is_valid(table["chunk_index"])),
            pc.is_valid(table["num_chunks"]),
        )
        t = table.filter(valid)
        t = _latest_version(t)
        # id -> (size, mtime_ns, sha256, version) of the latest version; ids from parts written before
        # versions were recorded have no entry (their source is unknown, never "changed").
        recorded = t.filter(pc.is_valid(t["source_version"]))
        rec = recorded.group_by("id").aggregate(
            [
                ("source_size", "max"),
                ("source_mtime_ns", "max"),
                ("source_sha256", "max"),
                ("source_version", "max"),
            ]
        )
        self._sources: dict[str, tuple[int | None, int | None, str | None, int]] = {
            i: (size, mtime, sha, ver)
            for i, size, mtime, sha, ver in zip(
                rec["id"].to_pylist(),
                rec["source_size_max"].to_pylist(),
                rec["source_mtime_ns_max"].to_pylist(),
                rec["source_sha256_max"].to_pylist(),
                rec["source_version_max"].to_pylist(),
                strict=True,
            )
        }
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
        self._failed: dict[str, set[int]] = {}
        for item_id, index in self._failed_keys:
            self._failed.setdefault(item_id, set()).add(index)

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
        return set(self._failed)

    def is_failed(self, item_id: str) -> bool:
        """The item has an error row not superseded by a successful row (cheap, per item)."""
        return item_id in self._failed

    def failed_chunks(self, item_id: str) -> set[int]:
        """The item's chunk indexes whose only rows are errors."""
        return set(self._failed.get(item_id, ()))

    def failed_keys(self) -> set[tuple[str, int]]:
        """(id, chunk_index) pairs whose only rows are errors."""
        return set(self._failed_keys)

    def version(self, item_id: str) -> int | None:
        """The item's latest source_version on disk; None if not written or written without versions."""
        rec = self._sources.get(item_id)
        return None if rec is None else rec[3]

    def recorded_source(self, item_id: str) -> Fingerprint | None:
        """The source fingerprint the item's latest version recorded (None: the file was unreadable)."""
        rec = self._sources.get(item_id)
        if rec is None or rec[0] is None or rec[1] is None:
            return None
        return Fingerprint(rec[0], rec[1], rec[2])

    def source_recorded(self, item_id: str) -> bool:
        """The item's rows carry a source_version (parts written before versions existed do not)."""
        return item_id in self._sources

    def __len__(self) -> int:
        return self._rows

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._done or item_id in self._partial


def _latest_version(t: pa.Table) -> pa.Table:
    """Only the rows of each id's highest source_version (null counts as 0)."""
    if t.num_rows == 0:
        return t
    version = pc.fill_null(t["source_version"], 0)
    mm = pc.min_max(version).as_py()
    if mm["min"] == mm["max"]:  # the common case: nothing was ever captioned twice
        return t
    t = t.append_column("_v", version)
    top = t.group_by("id").aggregate([("_v", "max")])
    joined = t.join(top, "id")
    joined = joined.filter(pc.equal(joined["_v"], joined["_v_max"]))
    return joined.select(t.column_names[:-1])


def current_rows(table: pa.Table) -> pa.Table:
    """The rows a reader should use: per (run, id) the highest source_version, then per chunk the latest.

    ``table`` is a whole dataset (``pyarrow.dataset.dataset(OUT, partitioning="hive").to_table()``)
    or one run's rows; a missing ``run`` column counts as one run. Row order is not kept.
    """
    if table.num_rows == 0:
        return table
    names = table.column_names
    run = table["run"] if "run" in names else pa.array([""] * table.num_rows, pa.string())
    if "source_version" in names:
        version = pc.fill_null(table["source_version"], 0)
    else:
        version = pa.array([0] * table.num_rows, pa.int32())
    work = pa.table(
        {
            "_run": pc.fill_null(pc.cast(run, pa.string()), ""),
            "_id": table["id"],
            "_chunk": table["chunk_index"],
            "_v": version,
            "_t": table["created_at"],
            "_row": pa.array(range(table.num_rows), pa.int64()),
        }
    )
    work = work.filter(pc.and_(pc.is_valid(work["_id"]), pc.is_valid(work["_chunk"])))
    top = work.group_by(["_run", "_id"], use_threads=False).aggregate([("_v", "max")])
    work = work.join(top, ["_run", "_id"])
    work = work.filter(pc.equal(work["_v"], work["_v_max"]))
    # Per (run, id, chunk): the latest created_at; ties (same microsecond) go to the later row.
    order = pc.sort_indices(work, sort_keys=[("_t", "descending"), ("_row", "descending")])
    work = work.take(order)
    first = work.group_by(["_run", "_id", "_chunk"], use_threads=False).aggregate([("_row", "first")])
    keep = pc.sort_indices(first["_row_first"])
    return table.take(first["_row_first"].take(keep))


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
    rows on disk are errors; the old error rows stay, so readers take the latest row per
    (run, id, chunk_index) (``current_rows``). ``ResumeIndex.failed_items`` then drops the items that
    succeeded.

    ``begin_item(id, source, version, rows)`` tells the sink the source fingerprint and
    source_version to record on the item's next ``rows`` rows; a version above the one on disk
    (the file changed) lets the item's keys be written again. Items never begun are written with a
    null fingerprint under their version on disk (0 for new items).

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
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not _RUN_KEY_RE.match(run_key):
            raise ValueError(f"run_key {run_key!r} is not a safe directory name")
        if rows_per_part < 1:
            raise ValueError("rows_per_part must be >= 1")
        self.out_dir = Path(out_dir)
        self.run_key = run_key
        self.run_dir = self.out_dir / f"run={run_key}"
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard {shard!r} is not (index, count) with 0 <= index < count")
        self.shard = shard if shard is not None and shard[1] > 1 else None
        # A shard writes its temp parts in its own folder, so it cleans up only what it left.
        self.tmp_dir = self.run_dir / TMP_DIR
        if self.shard is not None:
            self.tmp_dir = self.tmp_dir / f"shard-{self.shard[0]}-of-{self.shard[1]}"
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
        # id -> [fingerprint, source_version, rows still to come], from begin_item().
        self._sources: dict[str, list[Any]] = {}
        self._seeded = False
        self._closed = False
        self._lock = threading.RLock()
        self._lock_fds: list[int] = []

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
        """A whole run takes ``.lock`` exclusively; a shard takes it shared plus its own shard lock.

        So shards of one run write side by side, while a second copy of a shard, or an unsharded run
        beside any shard, is refused. The kernel drops a dead process's flock: no stale locks.
        """
        if self.shard is None:
            self._lock_fds.append(self._flock(self.run_dir / LOCK_FILE, fcntl.LOCK_EX, "this run"))
            return
        i, n = self.shard
        self._lock_fds.append(self._flock(self.run_dir / LOCK_FILE, fcntl.LOCK_SH, "this run unsharded"))
        try:
            self._lock_fds.append(
                self._flock(self.run_dir / f"{LOCK_FILE}.shard-{i}-of-{n}", fcntl.LOCK_EX, f"shard {i}/{n}")
            )
        except BaseException:
            self._release_lock()
            raise

    def _flock(self, path: Path, mode: int, what: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(_describe_oserror(path, "create lock file", exc)) from exc
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(
                    f"{self.run_dir}: another flamingo process is writing {what} (lock {path} is held); "
                    "it may still be running from an earlier start, so this one exits"
                ) from exc
            raise OutputError(_describe_oserror(path, "lock", exc)) from exc
        return fd

    def _release_lock(self) -> None:
        while self._lock_fds:
            fd = self._lock_fds.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)

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
        """Delete temp parts a crashed writer left (safe: we hold the run's or our shard's lock).

        An unsharded run holds the run exclusively, so it also clears the shards' temp folders.
        """
        try:
            for entry in self.tmp_dir.iterdir():
                if entry.is_file():
                    entry.unlink(missing_ok=True)
                elif self.shard is None and entry.is_dir() and entry.name.startswith("shard-"):
                    for inner in entry.iterdir():
                        if inner.is_file():
                            inner.unlink(missing_ok=True)
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
        return not (self.retry_failed and (key in self._retry_keys or key[0] in self._retry_ids))

    # -- writing ----------------------------------------------------------------------------------

    def _row(self, result: Result, source: Fingerprint | None, version: int) -> dict[str, Any]:
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
            "reasoning": result.reasoning,
            "finish_reason": result.finish_reason,
            "prompt_tokens": _opt_int(result.prompt_tokens),
            "output_tokens": _opt_int(result.output_tokens),
            "error": result.error if result.error is not None else chunk.error,
            "created_at": datetime.now(UTC),
            "source_size": None if source is None else source.size,
            "source_mtime_ns": None if source is None else source.mtime_ns,
            "source_sha256": None if source is None else source.sha256,
            "source_version": version,
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
        # Finished rows are valid even when the pipeline failed: flush them. If that fails too (the
        # disk is still full), the first error is the one to report; the rows are redone on resume.
        if exc is None:
            self.close()
            return
        with contextlib.suppress(OutputError):
            self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release_lock()


def read_metadata(part: str | Path) -> dict[str, Any]:
    """The ``flamingo`` key-value metadata of one part file."""
    meta = pq.read_schema(part).metadata or {}
    return json.loads(meta[METADATA_KEY])
