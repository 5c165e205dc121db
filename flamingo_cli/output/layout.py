"""The output layout every reader shares: the schema, the runs, their committed parts, the current rows.

Layout: ``OUT/run=<run_key>/part-<seq:06d>-<8 hex>.parquet`` (hive style, so
``pyarrow.dataset.dataset(OUT, partitioning="hive")`` exposes ``run`` as a column). OUT is a local
folder or an ``s3://bucket/prefix`` URL; any other URL scheme is refused (``folder.open_folder``).
On object stores a part is ``part-<seq>-<slot>-<8 hex>.parquet`` and counts once its commit-log
entry under ``OUT/run=<key>/_flamingo/log-<slot>/`` does (``committed``; ``writers`` has the
protocol); plan, inspect, export, the resume index and the tests read the layout through here.

One schema per run: the core columns (``SCHEMA``), the run's own extra columns, then its passthrough
columns (``columns.RunColumns``; the first part's schema wins). ``run`` is not stored in the parts
(a column named like the hive partition breaks pandas/pyarrow dataset reads); ``read_output`` and
``export`` add it as a real column (HF ``datasets`` does not read hive partitions).

Changed sources and the latest-row rule (incremental / cron runs):

* every row records what its source file looked like when it was captioned: ``source_size``,
  ``source_mtime_ns`` (``os.stat``) and, with ``--hash``, ``source_sha256``; null when the file
  could not be read (missing file, bad manifest row);
* an item whose file changed since (see ``resume.source_changed``) is captioned again under the
  next ``source_version`` (0 the first time). Parts are never rewritten, so the old rows stay;
* readers take, per (run, id), only the rows of the highest ``source_version`` and, among those, per
  chunk_index the latest ``created_at`` (only ``--retry-failed`` writes a key twice within one
  version: an error row, then the retry's row). ``current_rows()`` does exactly that with pyarrow;
  ``resume.ResumeIndex`` reads the same way; ``export`` writes only those rows, for readers that
  should not need the rule. A run without changed files and without ``--retry-failed`` holds every
  (id, chunk_index) exactly once, so plain reads need no filtering.

Rows with ``num_chunks == 0`` mean "no chunks could be made" (decode error, missing file): one row
with ``chunk_index = 0``, null start/end/duration/caption and ``error`` set (see
``records.error_result``). A chunk that failed keeps its real ``chunk_index``/``num_chunks`` and has
``error`` set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from flamingo_cli.errors import OutputError
from flamingo_cli.output.columns import stringify
from flamingo_cli.output.folder import Folder, local_path, open_folder

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
        # --- gates (issue 25a, flamingo_cli/gates.py): cheap measures of the chunk's decoded audio, and
        # whether it went without an engine request. Null on rows with nothing measured (error rows).
        ("rms_dbfs", pa.float64()),
        ("peak_dbfs", pa.float64()),
        ("active_ratio", pa.float64()),
        ("speech_ratio", pa.float64()),  # --vad only
        ("speech_segments", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())]))),
        ("audio_sha256", pa.string()),
        ("gate", pa.string()),  # null | "silence" | "duplicate"
        ("duplicate_of", pa.string()),
        ("duplicate_of_chunk", pa.int32()),
        # --- end gates
        # --- segments and tracks (issue 26) ---
        # "chunk" (a chunk's row, an item's one error row) or "track" (the whole item, from its chunks'
        # captions; chunk_index -1).
        ("level", pa.string()),
        # The caption's timestamps as typed spans in the source file's time (timestamps.py); [] for a
        # caption without timestamps, null on error rows.
        ("segments", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())]))),
        # --- confidence (issue 25b): how much to trust the caption (flamingo_cli/quality.py) ---
        # The mean log-probability of the generated tokens (a think model's answer tokens); null on
        # error rows and with --no-logprobs.
        ("avg_logprob", pa.float64()),
        # Whisper's measure of the caption: UTF-8 bytes / zlib-compressed bytes; null without a caption.
        ("compression_ratio", pa.float64()),
        # Reasons to look twice: repetition, empty, truncated, low_confidence, silence_hallucination;
        # [] when nothing is wrong, null on error rows.
        ("flags", pa.list_(pa.string())),
        # Engine requests the row took: 1, more with --fallback; null where no request was made.
        ("attempts", pa.int32()),
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
# Names a passthrough column may not take: the core columns and the hive partition column.
RESERVED_NAMES = frozenset([*SCHEMA.names, "run"])
# part-<seq>-<8 hex>.parquet; on object stores part-<seq>-<slot>-<8 hex>.parquet (slot: all, s<i>of<n>).
PART_RE = re.compile(r"^part-(\d+)-(?:(all|s\d+of\d+)-)?[0-9a-f]+\.parquet$")
RUN_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def run_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash (12 hex) of what makes a run: model, task, prompt, sampling params...

    Key order does not matter (json ``sort_keys``). The first character is forced to a letter
    (a-f) so that hive readers (pyarrow, duckdb) never infer the ``run`` column as a number.
    """
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return "abcdef"[int(digest[0], 16) % 6] + digest[1:]


# --- the commit log (object stores) ----------------------------------------------------------------

# Commit-log entries are created once and never changed or deleted: a process caches them by URL.
_LOG_CACHE: dict[str, dict[str, Any]] = {}


def read_log(folder: Folder, log: str) -> list[dict[str, Any]]:
    """One commit log's entries in order (each a small JSON object under <seq:010d>.json)."""
    from flamingo_cli.output.objstore import Store

    store = Store(folder.fs, folder.protocol)
    entries = []
    for name in folder.files(log):
        if not name.endswith(".json"):
            continue
        url = folder.url(f"{log}/{name}")
        entry = _LOG_CACHE.get(url)
        if entry is None:
            got = store.read(f"{log}/{name}")
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


def trusted(entries: list[dict[str, Any]]) -> list[str]:
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


def committed(folder: Folder, run_path: str) -> dict[str, str]:
    """{part name: the path to read it from} of one run on an object store, every slot's log."""
    meta = f"{run_path}/{META_DIR}"
    found: dict[str, str] = {}
    finals = set(folder.files(run_path))
    for log in folder.dirs(meta):
        if not log.startswith("log-"):
            continue
        for name in trusted(read_log(folder, f"{meta}/{log}")):
            # Committed but not yet copied into place (the writer died between the two): read the staged copy.
            found[name] = f"{run_path}/{name}" if name in finals else f"{meta}/{STAGING_DIR}/{name}{STAGED_SUFFIX}"
    return found


# --- runs and parts ----------------------------------------------------------------------------------


def _seq_sorted(names: list[str]) -> list[str]:
    def key(n: str) -> tuple[int, str]:
        m = PART_RE.match(n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def runs(out: str | Path) -> list[str]:
    """The run keys under OUT (folders ``run=<key>``), sorted."""
    folder = open_folder(out)
    names = folder.dirs(folder.root)
    return sorted(n.split("=", 1)[1] for n in names if n.startswith("run=") and RUN_KEY_RE.match(n[4:]))


def folder_part_files(folder: Folder, key: str) -> list[str]:
    """``part_files`` of an open Folder."""
    run_path = folder.join(f"run={key}")
    if folder.protocol:  # an object store: only what a commit log commits counts
        found = committed(folder, run_path)
        return [folder.url(found[n]) for n in _seq_sorted(list(found))]
    return [folder.join(f"run={key}", n) for n in _seq_sorted([n for n in folder.files(run_path) if PART_RE.match(n)])]


def part_files(out: str | Path, key: str) -> list[str]:
    """The complete (committed) parts of run ``key``, in sequence order: paths, or URLs on object stores."""
    return folder_part_files(open_folder(out), key)


def rows_on_disk(out: str | Path, key: str) -> int:
    """Rows in run ``key``'s committed parts (Parquet footers only); unreadable parts count 0."""
    folder = open_folder(out)
    fs, path = folder.arrow()
    total = 0
    for part in folder_part_files(folder, key):
        try:
            total += pq.ParquetFile(path(part), filesystem=fs).metadata.num_rows
        except Exception:
            continue
    return total


def first_part_schema(out: str | Path, key: str) -> pa.Schema | None:
    """The schema (with its metadata) of run ``key``'s first part, the run's schema; None if no part yet."""
    folder = open_folder(out)
    files = folder_part_files(folder, key)
    if not files:
        return None
    fs, path = folder.arrow()
    try:
        return pq.read_schema(path(files[0]), filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{files[0]}: cannot read the run's first part: {exc}") from exc


def read_columns(out: str | Path, key: str, schema: pa.Schema) -> pa.Table | None:
    """``schema``'s columns of run ``key``'s committed parts (null where a part lacks one); None if no part.

    Raises OSError or pyarrow's errors as they come (the caller words them).
    """
    folder = open_folder(out)
    files = folder_part_files(folder, key)
    if not files:
        return None
    fs, path = folder.arrow()
    dataset = ds.dataset([path(f) for f in files], schema=schema, format="parquet", filesystem=fs)
    return dataset.to_table(columns=schema.names)


def run_location(out: str | Path, key: str) -> str:
    """Run ``key``'s folder as a user names it (a path, or a URL on object stores)."""
    folder = open_folder(out)
    return folder.url(folder.join(f"run={key}"))


def run_dataset(out: str | Path, key: str) -> ds.Dataset | None:
    """Run ``key``'s committed parts as one pyarrow dataset with the run's schema (no ``run`` column).

    The schema is the core columns plus the first part's passthrough columns (older parts may lack
    later core columns: null there); the first part's metadata comes along. None if no part yet.
    """
    folder = open_folder(out)
    fs, path = folder.arrow()
    files = folder_part_files(folder, key)
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
        tables = [stringify(t, clash) for t in tables]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")
    if current:
        table = current_rows(table)
        order = pc.sort_indices(
            table, sort_keys=[("run", "ascending"), ("id", "ascending"), ("chunk_index", "ascending")]
        )
        table = table.take(order)
    return table


# --- the reading rule ----------------------------------------------------------------------------------


def latest_version(t: pa.Table) -> pa.Table:
    """Only the rows of each id's highest source_version (null counts as 0)."""
    if t.num_rows == 0:
        return t
    version = pc.fill_null(t["source_version"], 0)
    mm = pc.min_max(version).as_py()
    if mm["min"] == mm["max"]:  # the common case: nothing was ever captioned twice
        return t
    # Joined on (id, version, row number) only: list/struct columns cannot ride through a join. Row order kept.
    keys = pa.table({"id": t["id"], "_v": version, "_row": pa.array(range(t.num_rows), pa.int64())})
    top = keys.group_by("id").aggregate([("_v", "max")])
    joined = keys.join(top, "id")
    rows = joined.filter(pc.equal(joined["_v"], joined["_v_max"]))["_row"]
    return t.take(pc.take(rows, pc.sort_indices(rows)))


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


# --- run metadata ----------------------------------------------------------------------------------------


def read_scan(out: str | Path, key: str) -> dict[str, Any] | None:
    """The latest complete scan's skipped-file counts of a local run (``SCAN_FILE``), or None."""
    local = local_path(out)
    if local is None:
        return None
    try:
        doc = json.loads((local / f"run={key}" / SCAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_metadata(part: str | Path) -> dict[str, Any]:
    """The ``flamingo`` key-value metadata of one part file (a path, or a URL from ``part_files``)."""
    text = str(part)
    fs, path = open_folder(text.rsplit("/run=", 1)[0]).arrow() if local_path(text) is None else (None, str)
    meta = pq.read_schema(path(text), filesystem=fs).metadata or {}
    return json.loads(meta[METADATA_KEY])
