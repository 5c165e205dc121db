"""The output side: the one owner of the Parquet schema, the part files, the lock, the resume index and
the output layout (``runs``, ``part_files``, ``rows_on_disk``, ``read_run``, ``read_output``,
``export``: plan, inspect, the demo and the tests read the layout through these).

Layout: ``OUT/run=<run_key>/part-<seq:06d>-<8 hex>.parquet`` (hive style, so
``pyarrow.dataset.dataset(OUT, partitioning="hive")`` exposes ``run`` as a column). OUT is a local
folder or an ``s3://bucket/prefix`` URL; any other URL scheme is refused (see Object stores).

Exactly-once, crash-safe writing (local folders):

* a part is written to ``OUT/run=<key>/.tmp/<name>.tmp``, fsynced, ``os.replace``-d into place and the
  directory fsynced, so a reader never sees a half-written part (pyarrow, duckdb and pandas skip
  paths starting with ``.`` or ``_``); leftovers in ``.tmp`` from a crash are deleted on open;
* one ``Sink`` per run at a time: an exclusive ``flock`` on ``OUT/run=<key>/.lock`` makes a second
  one (say an overlapping cron job) fail with ``LockedError`` instead of writing duplicates;
* ``write()`` drops an (id, chunk_index) that is already on disk or already written by this sink.

Object stores (S3 and S3-compatible servers through s3fs; ``objstore.py``) have no rename and no
flock. The same guarantees come from conditional writes (``If-None-Match: *`` create-if-absent and
``If-Match: <etag>`` replace-if-unchanged), checked at open with a probe (a store that ignores them
is refused). Under ``OUT/run=<key>/_flamingo/``:

* ``lease-<slot>.json`` (slot ``all``, or ``s<i>of<n>`` for ``--shard i/n``): the lock. Created
  if absent; a live one (``expires_at`` ahead) refuses the second writer (``LockedError``, exit 5);
  an expired one (its writer died) is taken over by replace-if-unchanged, so of two takers one wins.
  The holder renews it every third of its lifetime (``FLAMINGO_LEASE_SECONDS``, default 60). A whole
  run and the shards of it exclude each other (each checks the other's lease after taking its own).
* ``log-<slot>/<seq:010d>.json``: the commit log, each entry created-if-absent at the next seq. A
  writer opens with ``{"kind": "open", "epoch": E}`` (E one above the log's highest); each part is
  committed by ``{"kind": "part", "epoch": E, "part": name}``. A part entry counts only under the
  latest epoch opened before it, so a writer paused past its lease (a zombie) is fenced out: its
  next commit meets the new writer's ``open`` entry and it stops with ``LockedError``.
* a part is PUT once under a unique key in ``staging/`` (a PUT is atomic), committed in the log,
  then copied to ``run=<key>/<name>`` where readers look, and the staged copy deleted. Plain readers
  therefore only ever see committed parts; the resume index reads the committed parts only (the
  staged copy of a committed part whose writer died before the copy). An uncommitted staged part
  (a writer killed between PUT and commit) is garbage: the next writer of its slot deletes it, and
  finishes the copies of committed ones.

One schema per run: the passthrough columns (manifest extras) and their types are fixed before the
first part (declared, ``sources.declared_columns``, or taken from the first part's rows) and kept
by every later part and every resume (the first part's schema wins); see ``Sink``. A value that
does not fit is stored null and named in the row's ``warnings``. ``run`` is not stored in the parts
(a column named like the hive partition breaks pandas/pyarrow dataset reads); ``read_output`` and
``export`` add it as a real column (HF ``datasets`` does not read hive partitions).

Changed sources and the latest-row rule (incremental / cron runs):

* every row records what its source file looked like when it was captioned: ``source_size``,
  ``source_mtime_ns`` (``os.stat``) and, with ``--hash``, ``source_sha256``; null when the file
  could not be read (missing file, bad manifest row);
* an item whose file changed since (see ``sources.source_changed``) is captioned again under the
  next ``source_version`` (0 the first time). Parts are never rewritten, so the old rows stay;
* readers take, per (run, id), only the rows of the highest ``source_version`` and, among those, per
  chunk_index the latest ``created_at`` (only ``--retry-failed`` writes a key twice within one
  version: an error row, then the retry's row). ``current_rows()`` does exactly that with pyarrow;
  ``ResumeIndex`` reads the same way; ``export`` writes only those rows, for readers that should not
  need the rule. A run without changed files and without ``--retry-failed`` holds every
  (id, chunk_index) exactly once, so plain reads need no filtering.

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
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flamingo_cli import __version__, objstore
from flamingo_cli.errors import LockedError, OutputError
from flamingo_cli.paths import escape_path, path_bytes
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sources import Fingerprint, merge_kinds, value_kind

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
        # Notes on passthrough values that did not fit the run's schema (stored null), "; "-joined.
        ("warnings", pa.string()),
        # The raw bytes of ``path`` when the file name is not valid UTF-8 (then ``path`` and a scanned
        # ``id`` hold paths.escape_path's ``\\xHH`` escape); null when ``path`` is the name as is.
        ("path_bytes", pa.binary()),
    ]
)

METADATA_KEY = b"flamingo"
PART_SUFFIX = ".parquet"
TMP_DIR = ".tmp"
LOCK_FILE = ".lock"
# What the latest complete folder scan of a run passed over (sources.ScanStats), for ``flamingo inspect``.
# The leading "_" makes pyarrow, duckdb and pandas skip it when they read OUT as a dataset.
SCAN_FILE = "_scan.json"
# Object stores: the run's lease, commit log and staged parts live under OUT/run=<key>/_flamingo/
# (readers skip paths starting with "_" or ".").
META_DIR = "_flamingo"
STAGING_DIR = "staging"
# Staged parts do not end in .parquet, so no reader's "**/*.parquet" glob ever picks one up.
STAGED_SUFFIX = ".staged"
LEASE_SECONDS = 60.0
# Passthrough column types a run may declare (sources.declared_columns gives these names).
COLUMN_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
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
# part-<seq>-<8 hex>.parquet; on object stores part-<seq>-<slot>-<8 hex>.parquet (slot: all, s<i>of<n>).
_PART_RE = re.compile(r"^part-(\d+)-(?:(all|s\d+of\d+)-)?[0-9a-f]+\.parquet$")
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


def _refuse_file_out(out_dir: Path) -> None:
    """``--out`` naming an existing file (or a path below one) is a usage mistake: say so, not "ENOTDIR"."""
    for p in (out_dir, *out_dir.parents):
        try:
            if p.exists() and not p.is_dir():
                if p == out_dir:
                    raise OutputError(f"--out is a file: {out_dir}; give a directory (it is created if missing)")
                raise OutputError(f"--out {out_dir}: cannot create output directory: {p} is a file")
            if p.exists():
                return
        except PermissionError:
            return


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


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def _to_json(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=_json_default)
    except TypeError:  # dict keys of mixed types cannot be sorted
        return json.dumps(value, ensure_ascii=False, default=_json_default)


def _passthrough_names(keys: list[str], reserved: frozenset[str] = RESERVED_NAMES) -> dict[str, str]:
    """Map manifest keys to column names; a key named like a core column becomes ``extra_<key>``."""
    mapping = {k: k for k in keys if k not in reserved}
    used = set(reserved) | set(keys)
    for k in keys:
        if k in reserved:
            name = f"extra_{k}"
            while name in used:
                name = f"extra_{name}"
            mapping[k] = name
            used.add(name)
    return mapping


def _key_of(name: str) -> str:
    """The manifest key a column name most likely came from, for parts written before the mapping was
    recorded in their metadata (``extra_id`` -> ``id``; ambiguous when a manifest had both)."""
    key = name
    while key.startswith("extra_"):
        key = key[len("extra_") :]
        if key in RESERVED_NAMES:
            return key
    return name


def _infer_type(values: list[Any]) -> pa.DataType:
    """The column type the values ask for (see ``sources.merge_kinds``); all-null is string."""
    return COLUMN_TYPES[merge_kinds(value_kind(v) for v in values) or "string"]


def _fit(value: Any, typ: pa.DataType) -> tuple[Any, bool]:
    """``value`` as a cell of a ``typ`` column, and whether it fits (False: stored null, warned)."""
    if value is None:
        return None, True
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None, True
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return (value if isinstance(value, str) else _to_json(value)), True
    kind = value_kind(value)
    if pa.types.is_boolean(typ):
        return (bool(value), True) if kind == "bool" else (None, False)
    if pa.types.is_integer(typ):
        return (int(value), True) if kind == "int64" else (None, False)
    if pa.types.is_floating(typ):
        return (float(value), True) if kind in ("int64", "float64") else (None, False)
    try:  # a type only a legacy first part has (timestamp, ...): whatever Arrow converts
        pa.array([value], type=typ)
    except (pa.ArrowException, TypeError, ValueError):
        return None, False
    return value, True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


# --- the output layout: one owner for every reader (plan, inspect, export, tests) --------------------


def _remote_root(out: str | Path) -> tuple[objstore.Store, str] | None:
    """(store, root path) for an object-store URL, None for a local path; OutputError if unusable."""
    if not objstore.is_remote(str(out)):
        return None
    try:
        return objstore.open_store(str(out))
    except objstore.StoreError as exc:
        raise OutputError(str(exc)) from exc


def _local(out: str | Path) -> Path:
    text = str(out)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


# Commit-log entries are created once and never changed or deleted: a process caches them by URL.
_LOG_CACHE: dict[str, dict[str, Any]] = {}


def _read_log(store: objstore.Store, folder: str) -> list[dict[str, Any]]:
    """One commit log's entries in order (each a small JSON object under <seq:010d>.json)."""
    entries = []
    for name in store.listdir(folder):
        if not name.endswith(".json"):
            continue
        url = store.url(f"{folder}/{name}")
        entry = _LOG_CACHE.get(url)
        if entry is None:
            got = store.read(f"{folder}/{name}")
            if got is None:
                continue
            try:
                entry = json.loads(got[0])
            except ValueError as exc:
                raise OutputError(f"{url}: commit record is not JSON: {exc}") from exc
            entry["_seq"] = int(name.split(".", 1)[0])
            _LOG_CACHE[url] = entry
        entries.append(entry)
    return entries


def _trusted(entries: list[dict[str, Any]]) -> list[str]:
    """Committed part names: a part entry counts only under the latest epoch opened before it.

    A writer that lost its lease (paused past expiry) and commits after the next writer opened is
    fenced out: its entry carries an older epoch.
    """
    epoch, parts = 0, []
    for e in entries:
        if e.get("kind") == "open":
            epoch = max(epoch, int(e.get("epoch", 0)))
        elif e.get("kind") == "part" and int(e.get("epoch", -1)) == epoch:
            parts.append(str(e["part"]))
    return parts


def _committed(store: objstore.Store, run_path: str) -> dict[str, str]:
    """{part name: the path to read it from} of one run on an object store, every slot's log."""
    meta = f"{run_path}/{META_DIR}"
    found: dict[str, str] = {}
    finals = set(store.listdir(run_path))
    for log in store.listdirs(meta):
        if not log.startswith("log-"):
            continue
        for name in _trusted(_read_log(store, f"{meta}/{log}")):
            # Committed but not yet copied into place (the writer died between the two): read the staged copy.
            found[name] = f"{run_path}/{name}" if name in finals else f"{meta}/{STAGING_DIR}/{name}{STAGED_SUFFIX}"
    return found


def _seq_sorted(names: list[str]) -> list[str]:
    def key(n: str) -> tuple[int, str]:
        m = _PART_RE.match(n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def runs(out: str | Path) -> list[str]:
    """The run keys under OUT (folders ``run=<key>``), sorted."""
    remote = _remote_root(out)
    if remote is not None:
        store, root = remote
        names = store.listdirs(root)
    else:
        base = _local(out)
        try:
            names = [e.name for e in os.scandir(base) if e.is_dir()] if base.is_dir() else []
        except OSError as exc:
            raise OutputError(_describe_oserror(base, "list", exc)) from exc
    return sorted(n.split("=", 1)[1] for n in names if n.startswith("run=") and _RUN_KEY_RE.match(n[4:]))


def part_files(out: str | Path, key: str) -> list[str]:
    """The complete (committed) parts of run ``key``, in sequence order: paths, or URLs on object stores."""
    remote = _remote_root(out)
    if remote is not None:
        store, root = remote
        committed = _committed(store, f"{root}/run={key}")
        return [store.url(committed[n]) for n in _seq_sorted(list(committed))]
    run_dir = _local(out) / f"run={key}"
    try:
        names = [e.name for e in os.scandir(run_dir) if e.is_file() and _PART_RE.match(e.name)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(_describe_oserror(run_dir, "list", exc)) from exc
    return [str(run_dir / n) for n in _seq_sorted(names)]


def _arrow_fs(out: str | Path) -> tuple[Any, Callable[[str], str]]:
    """A pyarrow filesystem for OUT and a function from part_files() entries to its paths."""
    remote = _remote_root(out)
    if remote is None:
        return None, str
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    store = remote[0]
    return PyFileSystem(FSSpecHandler(store.fs)), lambda url: url.split("://", 1)[1]


def rows_on_disk(out: str | Path, key: str) -> int:
    """Rows in run ``key``'s committed parts (Parquet footers only); unreadable parts count 0."""
    fs, path = _arrow_fs(out)
    total = 0
    for part in part_files(out, key):
        try:
            total += pq.ParquetFile(path(part), filesystem=fs).metadata.num_rows
        except Exception:
            continue
    return total


def run_dataset(out: str | Path, key: str) -> ds.Dataset | None:
    """Run ``key``'s committed parts as one pyarrow dataset with the run's schema (no ``run`` column).

    The schema is the core columns plus the first part's passthrough columns (older parts may lack
    later core columns: null there); the first part's metadata comes along. None if no part yet.
    """
    fs, path = _arrow_fs(out)
    files = part_files(out, key)
    if not files:
        return None
    try:
        first = pq.read_schema(path(files[0]), filesystem=fs)
        fields = list(SCHEMA) + [f for f in first if f.name not in SCHEMA.names]
        schema = pa.schema(fields, metadata=first.metadata)
        return ds.dataset([path(f) for f in files], schema=schema, format="parquet", filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{out}: cannot read run {key}: {exc}") from exc


def read_run(out: str | Path, key: str, columns: list[str] | None = None) -> pa.Table:
    """Every row of run ``key`` (superseded ones too) with the run's schema, plus a ``run`` column."""
    dataset = run_dataset(out, key)
    if dataset is None:
        table = pa.schema([*SCHEMA, pa.field("run", pa.string())]).empty_table()
        return table.select(columns) if columns else table
    try:
        table = dataset.to_table(columns=[c for c in columns if c != "run"] if columns else None)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{out}: cannot read run {key}: {exc}") from exc
    run = pa.array([key] * table.num_rows, pa.string())
    table = table.append_column(pa.field("run", pa.string()), run)
    return table.select(columns) if columns else table


def read_output(out: str | Path, run: str | None = None, current: bool = True) -> pa.Table:
    """All runs (or one) of OUT as one table with a real ``run`` column; ``current``: current_rows only.

    Runs may declare different passthrough columns: a column missing in a run is null there; a column
    two runs type differently is read as string in both (JSON text for non-strings).
    """
    keys = runs(out) if run is None else [run]
    tables = [read_run(out, k) for k in keys]
    tables = [t for t in tables if t.num_rows] or tables[:1]
    if not tables:
        raise OutputError(f"{out}: no run=<key> folders: not a flamingo output (or nothing written yet)")
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    clash = {n for n, ts in types.items() if len(ts) > 1}
    if clash:
        tables = [_stringify(t, clash) for t in tables]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")
    if current:
        table = current_rows(table)
        order = pc.sort_indices(
            table, sort_keys=[("run", "ascending"), ("id", "ascending"), ("chunk_index", "ascending")]
        )
        table = table.take(order)
    return table


def _stringify(table: pa.Table, names: set[str]) -> pa.Table:
    for name in names & set(table.column_names):
        i = table.column_names.index(name)
        values = [None if v is None else (v if isinstance(v, str) else _to_json(v)) for v in table[name].to_pylist()]
        table = table.set_column(i, pa.field(name, pa.string()), pa.array(values, pa.string()))
    return table


EXPORT_FORMATS = ("parquet", "jsonl", "hf")


def export(out: str | Path, dest: str | Path, fmt: str = "parquet", run: str | None = None) -> int:
    """Write OUT's current rows (``read_output``) to ``dest``; returns the row count.

    parquet: one file; jsonl: one file, one object per row; hf: a ``datasets.load_from_disk`` folder.
    Local destinations appear whole or not at all (temp + rename); on object stores one PUT is atomic.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    table = read_output(out, run=run)
    dest_s = str(dest)
    if fmt == "hf":
        return _export_hf(table, dest_s)
    buf = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, buf, compression="zstd")
    else:
        lines = (json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in table.to_pylist())
        buf.write("".join(lines).encode("utf-8"))
    data = buf.getvalue().to_pybytes()
    remote = _remote_root(dest_s) if objstore.is_remote(dest_s) else None
    if objstore.is_remote(dest_s):
        if remote is None:  # pragma: no cover - _remote_root raises for unsupported stores
            raise OutputError(f"{dest_s}: cannot write")
        store, path = remote
        try:
            store.put(path, data)
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        return table.num_rows
    target = _local(dest_s)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(_describe_oserror(target, "write", exc)) from exc
    return table.num_rows


def _export_hf(table: pa.Table, dest: str) -> int:
    try:
        import datasets
    except ImportError as exc:
        raise OutputError(f"{dest}: --format hf needs the datasets package: pip install datasets") from exc
    dataset = datasets.Dataset(table)
    if objstore.is_remote(dest):
        dataset.save_to_disk(dest)
        return table.num_rows
    target = _local(dest)
    if target.exists():
        raise OutputError(f"{target}: already exists (export writes a new folder; remove it first)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        dataset.save_to_disk(str(tmp))
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(_describe_oserror(target, "write", exc)) from exc
    return table.num_rows


# --- the sink ------------------------------------------------------------------------------------


class Sink:
    """Buffers Results and writes them as exactly-once Parquet parts of one run.

    ``write()`` flushes a part when ``rows_per_part`` rows are buffered or ``flush_seconds`` have
    passed since the first buffered row (checked on ``write`` and ``flush_if_due``). A failed flush
    (disk full, ...) removes its temp file, keeps the rows buffered for a later retry and raises
    ``OutputError``.

    One schema per run: passthrough columns (``AudioItem.extra``) follow the core columns with the
    same names and types in every part. They are fixed before the first part: by the run's first
    part if there is one (a resume), else by ``columns`` ({manifest key: string|int64|float64|bool},
    see ``sources.declared_columns``), else by the rows of the first part (str -> string, bool ->
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

    ``out_dir`` is a local folder or an ``s3://bucket/prefix`` URL (see "Object stores" in the
    module docstring); ``lease_seconds`` is the object-store lease's lifetime (renewed every third of
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
    ) -> None:
        if not _RUN_KEY_RE.match(run_key):
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
        self._extra_names = frozenset(f.name for f in self.extra_fields)
        self._reserved = RESERVED_NAMES | self._extra_names
        self.run_key = run_key
        self.shard = shard if shard is not None and shard[1] > 1 else None
        remote = _remote_root(out_dir)
        self._store: objstore.Store | None = None
        if remote is not None:
            self._store, root = remote
            self.out_dir: Path | str = str(out_dir).rstrip("/")
            self.run_dir: Path | str = f"{self.out_dir}/run={run_key}"
            self._run_path = f"{root}/run={run_key}"
            self._meta = f"{self._run_path}/{META_DIR}"
            self._slot = "all" if self.shard is None else f"s{self.shard[0]}of{self.shard[1]}"
            self.tmp_dir: Path | str = f"{self._meta}/{STAGING_DIR}"
        else:
            self.out_dir = _local(out_dir)
            self.run_dir = self.out_dir / f"run={run_key}"
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
        # A sources.ScanStats the caller attaches; close() records its counts in SCAN_FILE.
        self.scan: Any = None
        # Object stores: the lease (path, ETag, owner token), this writer's epoch and next log seq.
        self._lease_seconds = float(lease_seconds or os.environ.get("FLAMINGO_LEASE_SECONDS") or LEASE_SECONDS)
        self._lease_etag: str | None = None
        self._lease_lost: str | None = None
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._lease_mutex = threading.Lock()
        self._owner = secrets.token_hex(8)
        self._epoch = 0
        self._log_next = 0
        # The run's passthrough columns: manifest key -> (column name, type); None until decided.
        self._fields: dict[str, tuple[str, pa.DataType]] | None = None
        self._declared = dict(columns) if columns else None

        if self._store is not None:
            self._open_remote(lock, check_writable)
        else:
            self._open_local(lock, check_writable)
        try:
            self._decide_schema()
        except BaseException:
            self._release_lock()
            raise

    def _open_local(self, lock: bool, check_writable: bool) -> None:
        assert isinstance(self.tmp_dir, Path) and isinstance(self.run_dir, Path)
        _refuse_file_out(_local(self.out_dir))
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
        assert isinstance(self.run_dir, Path)
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
        if self._store is not None:
            self._release_lease()

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
        assert isinstance(self.tmp_dir, Path)
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

    # -- object stores: lease, commit log, staged parts --------------------------------------------

    def _lease_path(self, slot: str) -> str:
        return f"{self._meta}/lease-{slot}.json"

    def _lease_doc(self) -> bytes:
        doc = {
            "owner": self._owner,
            "expires_at": time.time() + self._lease_seconds,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        return json.dumps(doc).encode("utf-8")

    def _live_lease(self, path: str) -> dict[str, Any] | None:
        """The lease at ``path`` if another writer holds it and it has not expired."""
        assert self._store is not None
        got = self._store.read(path)
        if got is None:
            return None
        try:
            doc = json.loads(got[0])
        except ValueError:
            return None
        if doc.get("owner") == self._owner or float(doc.get("expires_at", 0)) <= time.time():
            return None
        return doc

    def _locked(self, path: str, doc: Mapping[str, Any], what: str) -> LockedError:
        assert self._store is not None
        left = max(0.0, float(doc.get("expires_at", 0)) - time.time())
        return LockedError(
            f"{self.run_dir}: another flamingo process is writing {what} (lease {self._store.url(path)} is held "
            f"by {doc.get('host')} pid {doc.get('pid')}, expires in {left:.0f} s unless renewed); "
            "it may still be running from an earlier start, so this one exits"
        )

    def _take_lease(self) -> None:
        """Create the slot's lease object, or take over one that expired (replace-if-unchanged)."""
        assert self._store is not None
        path = self._lease_path(self._slot)
        what = "this run" if self.shard is None else f"shard {self.shard[0]}/{self.shard[1]}"
        for _ in range(5):
            etag = self._store.create(path, self._lease_doc())
            if etag is not None:
                self._lease_etag = etag
                break
            got = self._store.read(path)
            if got is None:  # released between the two calls: try to create it again
                continue
            data, old = got
            try:
                doc = json.loads(data)
            except ValueError:
                doc = {}
            if float(doc.get("expires_at", 0)) > time.time():
                raise self._locked(path, doc, what)
            etag = self._store.replace(path, self._lease_doc(), old)  # the holder died: take it over
            if etag is None:
                raise self._locked(path, doc, what)  # another process took it over first
            self._lease_etag = etag
            break
        else:
            raise OutputError(f"{self._store.url(path)}: cannot take the run's lease (it keeps changing)")
        # A whole run excludes every shard and a shard the whole run: each checks after taking its
        # own lease, so of two that start together at least one sees the other.
        if self.shard is None:
            others = [
                n[len("lease-") : -len(".json")] for n in self._store.listdir(self._meta) if n.startswith("lease-s")
            ]
        else:
            others = ["all"]
        for slot in others:
            doc = self._live_lease(self._lease_path(slot))
            if doc is not None:
                self._release_lease()
                label = "this run unsharded" if slot == "all" else f"shard {slot[1:].replace('of', '/')}"
                raise self._locked(self._lease_path(slot), doc, label)

    def _renew_loop(self) -> None:
        while not self._lease_stop.wait(self._lease_seconds / 3):
            self._renew()

    def _renew(self) -> None:
        assert self._store is not None
        with self._lease_mutex:
            if self._lease_etag is None or self._lease_lost:
                return
            try:
                etag = self._store.replace(self._lease_path(self._slot), self._lease_doc(), self._lease_etag)
            except objstore.StoreError:
                return  # a transient failure: try again at the next tick (the lease is still valid)
            if etag is None:
                self._lease_lost = "another writer took over the run's lease (this one was paused past its expiry)"
            else:
                self._lease_etag = etag

    def _release_lease(self) -> None:
        self._lease_stop.set()
        thread, self._lease_thread = self._lease_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        store = self._store
        with self._lease_mutex:
            etag, self._lease_etag = self._lease_etag, None
            if store is None or etag is None or self._lease_lost:
                return
            path = self._lease_path(self._slot)
            with contextlib.suppress(objstore.StoreError):
                got = store.read(path)
                if got is not None and got[1] == etag:
                    store.delete(path)

    def _append_log(self, entry: dict[str, Any]) -> int:
        """Create the next entry of this slot's log (create-if-absent); returns its seq.

        Stepping over entries others created, a part commit that meets an ``open`` of a newer epoch
        has been fenced out: LockedError, and the part stays uncommitted (garbage, cleaned later).
        """
        assert self._store is not None
        log = f"{self._meta}/log-{self._slot}"
        data = json.dumps(entry, sort_keys=True).encode("utf-8")
        seq = self._log_next
        for _ in range(10_000):
            path = f"{log}/{seq:010d}.json"
            if self._store.create(path, data) is not None:
                self._log_next = seq + 1
                return seq
            got = self._store.read(path)
            other = json.loads(got[0]) if got is not None else {}
            if entry["kind"] == "part" and other.get("kind") == "open" and int(other.get("epoch", 0)) > self._epoch:
                self._lease_lost = "another writer took over the run (its commit log moved past this writer's epoch)"
                raise LockedError(f"{self.run_dir}: {self._lease_lost}; this writer stops, the other one goes on")
            seq += 1
        raise OutputError(f"{self._store.url(log)}: cannot append to the commit log")

    def _open_remote(self, lock: bool, check_writable: bool) -> None:
        """Take the lease, open a new epoch in the commit log, finish or clean what a dead writer left."""
        assert self._store is not None
        store = self._store
        try:
            if check_writable:
                store.check_conditional(self._meta)
            if lock:
                self._take_lease()
            try:
                log = f"{self._meta}/log-{self._slot}"
                entries = _read_log(store, log)
                self._log_next = max((e["_seq"] for e in entries), default=-1) + 1
                top = max((int(e.get("epoch", 0)) for e in entries if e.get("kind") == "open"), default=0)
                if lock:
                    self._epoch = top + 1
                    seq = self._append_log({"kind": "open", "epoch": self._epoch, "owner": self._owner})
                    entries = [e for e in _read_log(store, log) if e["_seq"] <= seq]
                else:
                    self._epoch = top
                self._roll_forward(entries)
                if lock:
                    self._lease_thread = threading.Thread(target=self._renew_loop, name="flamingo-lease", daemon=True)
                    self._lease_thread.start()
            except BaseException:
                self._release_lease()
                raise
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        names = [n for n in store.listdir(self._run_path) if _PART_RE.match(n)]
        self._next_seq = max((int(m.group(1)) for n in names if (m := _PART_RE.match(n))), default=-1) + 1

    def _mine(self, name: str) -> bool:
        """A part name this writer's slot may clean: its own slot's, or any slot's for a whole run."""
        m = _PART_RE.match(name)
        if m is None:
            return False
        return self.shard is None or m.group(2) == self._slot

    def _roll_forward(self, entries: list[dict[str, Any]]) -> None:
        """Copy committed-but-staged parts into place; delete uncommitted ones (a writer died mid-part)."""
        assert self._store is not None
        store = self._store
        trusted = set(_committed(store, self._run_path))
        # A whole run holds every slot: it finishes the shards' committed copies too.
        mine = trusted if self.shard is None else set(_trusted(entries))
        staging = f"{self._meta}/{STAGING_DIR}"
        finals = set(store.listdir(self._run_path))
        for staged in store.listdir(staging):
            name = staged.removesuffix(STAGED_SUFFIX)
            if not self._mine(name):
                continue
            if name in mine and name not in finals:
                store.copy(f"{staging}/{staged}", f"{self._run_path}/{name}")
            if name not in trusted or name in mine:
                store.delete(f"{staging}/{staged}")
        for name in finals:
            if self._mine(name) and name not in trusted:
                store.delete(f"{self._run_path}/{name}")  # a visible part no log commits (never expected)

    # -- layout -----------------------------------------------------------------------------------

    def part_files(self) -> list[Path]:
        """The complete parts of this run, in sequence order (URLs as strings on object stores)."""
        files = part_files(self.out_dir, self.run_key)
        return files if self._store is not None else [Path(f) for f in files]  # type: ignore[return-value]

    def _max_seq(self) -> int:
        seqs = [int(m.group(1)) for p in self.part_files() if (m := _PART_RE.match(Path(str(p)).name))]
        return max(seqs, default=-1)

    # -- the run's schema -------------------------------------------------------------------------

    def _decide_schema(self) -> None:
        """Fix the passthrough columns: the first part's, else the declared ones (else at first flush)."""
        files = part_files(self.out_dir, self.run_key)
        if files:
            fs, path = _arrow_fs(self.out_dir)
            try:
                first = pq.read_schema(path(str(files[0])), filesystem=fs)
            except (OSError, pa.ArrowException) as exc:
                raise OutputError(f"{files[0]}: cannot read the run's first part: {exc}") from exc
            try:
                recorded = json.loads((first.metadata or {})[METADATA_KEY]).get("passthrough") or {}
            except (KeyError, ValueError, AttributeError):
                recorded = {}
            keys = {name: str(key) for name, key in recorded.items()} if isinstance(recorded, dict) else {}
            self._fields = {
                keys.get(f.name) or _key_of(f.name): (f.name, f.type)
                for f in first
                if f.name not in SCHEMA.names and f.name not in self._extra_names
            }
        elif self._declared is not None:
            names = _passthrough_names(list(self._declared), self._reserved)
            self._fields = {k: (names[k], COLUMN_TYPES[t]) for k, t in self._declared.items()}
        self._record_fields()

    def _record_fields(self) -> None:
        """Put the column -> manifest key mapping in the parts' metadata (a resume reads it back)."""
        if self._fields is not None:
            self.run_info["passthrough"] = {name: key for key, (name, _) in self._fields.items()}

    @property
    def columns(self) -> dict[str, str] | None:
        """The run's passthrough columns {column name: Arrow type name}; None until decided."""
        if self._fields is None:
            return None
        return {name: str(typ) for name, typ in self._fields.values()}

    # -- resume -----------------------------------------------------------------------------------

    def load_index(self) -> ResumeIndex:
        """Read id, chunk_index, num_chunks, error of this run's complete parts (buffered rows excluded)."""
        files = part_files(self.out_dir, self.run_key)
        if files:
            fs, path = _arrow_fs(self.out_dir)
            try:
                dataset = ds.dataset([path(f) for f in files], schema=_INDEX_SCHEMA, format="parquet", filesystem=fs)
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
        """The buffered rows as one part with the run's schema (decided here if still open)."""
        extras = [{str(k): v for k, v in extra.items()} for _, extra in self._buffer]
        if self._fields is None:
            keys: dict[str, None] = {}
            for extra in extras:
                keys.update(dict.fromkeys(extra))
            names = _passthrough_names(list(keys), self._reserved)
            self._fields = {k: (names[k], _infer_type([e.get(k) for e in extras])) for k in keys}
            self._record_fields()
        fields = self._fields
        warnings: list[list[str]] = [[] for _ in extras]
        columns: dict[str, list[Any]] = {k: [] for k in fields}
        for row_warnings, extra in zip(warnings, extras, strict=True):
            for k, (_, typ) in fields.items():
                value, ok = _fit(extra.get(k), typ)
                if not ok:
                    row_warnings.append(f"{k}: {_short(extra[k])} is not {typ}; stored null")
                columns[k].append(value)
            for k in extra:
                if k not in fields and extra[k] is not None:
                    row_warnings.append(f"{k}: not a column of this run (fixed by its first part); dropped")
        rows = [r for r, _ in self._buffer]
        for r, w in zip(rows, warnings, strict=True):
            r["warnings"] = "; ".join(w) if w else None
        core = [*SCHEMA, *self.extra_fields]
        arrays = [pa.array([r[f.name] for r in rows], type=f.type) for f in core]
        arrays += [pa.array(columns[k], type=typ) for k, (_, typ) in fields.items()]
        schema = pa.schema(
            [*core, *(pa.field(name, typ) for name, typ in fields.values())],
            metadata={METADATA_KEY: json.dumps(self.run_info, sort_keys=True, default=str).encode("utf-8")},
        )
        return pa.Table.from_arrays(arrays, schema=schema)

    def _account(self) -> None:
        self._next_seq += 1
        self.rows_written += len(self._buffer)
        self.parts_written += 1
        self._buffer.clear()
        self._first_buffered_at = None

    def flush(self) -> None:
        """Write the buffered rows as one atomic part; no-op if empty."""
        with self._lock:
            if not self._buffer:
                return
            table = self._table()
            if self._store is not None:
                self._flush_remote(table)
                return
            assert isinstance(self.tmp_dir, Path) and isinstance(self.run_dir, Path)
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
            self._account()
            try:
                _fsync_dir(self.run_dir)
            except OSError as exc:
                raise OutputError(_describe_oserror(self.run_dir, "fsync directory", exc)) from exc

    def _flush_remote(self, table: pa.Table) -> None:
        """Stage the part under a unique key, commit it in the log, then copy it where readers look."""
        assert self._store is not None
        store = self._store
        if self._lease_lost:
            raise LockedError(f"{self.run_dir}: {self._lease_lost}; this writer stops, the other one goes on")
        name = f"part-{self._next_seq:06d}-{self._slot}-{secrets.token_hex(4)}{PART_SUFFIX}"
        staged = f"{self._meta}/{STAGING_DIR}/{name}{STAGED_SUFFIX}"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        try:
            if store.create(staged, buf.getvalue().to_pybytes()) is None:
                raise OutputError(f"{store.url(staged)}: a part of that name exists already")
            try:
                self._append_log({"kind": "part", "epoch": self._epoch, "part": name, "rows": table.num_rows})
            except BaseException:
                with contextlib.suppress(objstore.StoreError):
                    store.delete(staged)
                raise
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        # Committed from here on: account for it even if the copy fails (the next open finishes it).
        self._account()
        try:
            store.copy(staged, f"{self._run_path}/{name}")
            store.delete(staged)
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc

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
                self._release_lock()

    def _write_scan(self) -> None:
        """Record the attached scan's skipped-file counts (atomically; best effort: the summary has them too).

        Only a scan that read every input (an interrupted one would replace complete counts with partial
        ones), and only for local outputs.
        """
        scan = self.scan
        if scan is None or not scan.finished or self._store is not None:
            return
        assert isinstance(self.tmp_dir, Path) and isinstance(self.run_dir, Path)
        doc = {
            "skipped": scan.skipped(),
            "skipped_total": scan.total,
            "complete": True,
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.tmp_dir / f"{SCAN_FILE}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(doc, sort_keys=True, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, self.run_dir / SCAN_FILE)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

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


def read_scan(out: str | Path, key: str) -> dict[str, Any] | None:
    """The latest complete scan's skipped-file counts of a local run (``SCAN_FILE``), or None."""
    if _remote_root(out) is not None:
        return None
    try:
        doc = json.loads((_local(out) / f"run={key}" / SCAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_metadata(part: str | Path) -> dict[str, Any]:
    """The ``flamingo`` key-value metadata of one part file (a path, or a URL from ``part_files``)."""
    fs, path = _arrow_fs(str(part).rsplit("/run=", 1)[0]) if objstore.is_remote(str(part)) else (None, str)
    meta = pq.read_schema(path(str(part)), filesystem=fs).metadata or {}
    return json.loads(meta[METADATA_KEY])
