"""The resume index: what a run already holds, as the planner asks it (done, partial, failed, changed).

``ResumeIndex`` is built from the committed parts of one run (``load_index``) with the same reading
rule as ``output.layout.current_rows``: only each item's latest ``source_version`` counts. Every
row records what its source file looked like (``fingerprint``: size, mtime and, with ``--hash``,
sha256); ``source_changed`` compares that with the file now, and ``ResumeIndex.source_version``
answers the planner's question with both: the version an item's next rows get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flamingo_cli import remote
from flamingo_cli.errors import OutputError
from flamingo_cli.output.layout import SCHEMA, current_rows, latest_version, read_columns, run_dataset, run_location
from flamingo_cli.records import TRACK_INDEX, AudioItem, Fingerprint

INDEX_COLUMNS = [
    "id",
    "chunk_index",
    "num_chunks",
    "error",
    "source_size",
    "source_mtime_ns",
    "source_sha256",
    "source_version",
    # gates: the audio hash of captioned chunks (duplicates across invocations), silence-gated chunks
    "audio_sha256",
    "gate",
]
INDEX_SCHEMA = pa.schema([SCHEMA.field(c) for c in INDEX_COLUMNS])

# --- change detection ------------------------------------------------------------------------------

_HASH_BLOCK = 1 << 20


def _remote_fingerprint(url: str, content_hash: bool) -> Fingerprint | None:
    """size + mtime (or an ETag/version stamp) from the store's metadata; sha256 reads the object."""
    try:
        st = remote.info(url)
        if st.get("type") == "directory":
            return None
        size, mtime = remote.version_of(st)
        digest = None
        if content_hash:
            h = hashlib.sha256()
            with remote.open_binary(url) as f:
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
            digest = h.hexdigest()
    except Exception:  # not found, no credentials, network: "cannot read now", never "changed"
        return None
    return Fingerprint(size, mtime or 0, digest)


def fingerprint(src: str | AudioItem, content_hash: bool = False) -> Fingerprint | None:
    """Stat (and with ``content_hash`` read and hash) the item's source; None when it cannot be read.

    ``src`` is a path, a URL (the store's size and modification time, or an ETag/version stamp where it
    has none) or an item: one with embedded bytes is fingerprinted by its bytes (size, and a 63-bit
    content stamp in the mtime slot, so a changed row is seen without --hash)."""
    if isinstance(src, AudioItem):
        if src.data is not None:
            data = src.data
            sha = hashlib.sha256(data).hexdigest() if content_hash else None
            return Fingerprint(len(data), remote.stamp(data), sha)
        src = src.path
    if remote.is_url(src):
        return _remote_fingerprint(src, content_hash)
    path = src
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        digest = None
        if content_hash:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
            digest = h.hexdigest()
    except OSError:
        return None
    return Fingerprint(int(st.st_size), int(st.st_mtime_ns), digest)


def source_changed(recorded: Fingerprint | None, current: Fingerprint | None, content_hash: bool = False) -> bool:
    """True when the file differs from what was captioned, so the item must be captioned again.

    ``current is None`` (the file cannot be read now: a mount is down, it vanished) never counts as a
    change, so a transient outage does not supersede good captions. ``recorded is None`` (the file
    could not be read last time, e.g. a manifest row whose file did not exist yet) and a readable file
    now counts as a change. With ``content_hash`` the sha256 decides where both sides have one;
    otherwise size and mtime do.
    """
    if current is None:
        return False
    if recorded is None:
        return True
    if content_hash and recorded.sha256 is not None and current.sha256 is not None:
        return recorded.sha256 != current.sha256
    return (recorded.size, recorded.mtime_ns) != (current.size, current.mtime_ns)


# --- the index -------------------------------------------------------------------------------------


def load_index(out: str | Path, run_key: str) -> ResumeIndex:
    """The index of run ``run_key``'s committed parts in OUT (empty when it has none)."""
    try:
        table = read_columns(out, run_key, INDEX_SCHEMA)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{run_location(out, run_key)}: cannot read existing parts for resume: {exc}") from exc
    return ResumeIndex(table)


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
            table = INDEX_SCHEMA.empty_table()
        for name in INDEX_COLUMNS:  # tables from before a column existed, or hand-made ones
            if name not in table.column_names:
                f = INDEX_SCHEMA.field(name)
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        self._rows = table.num_rows
        valid = pc.and_(
            pc.and_(pc.is_valid(table["id"]), pc.is_valid(table["chunk_index"])),
            pc.is_valid(table["num_chunks"]),
        )
        t = table.filter(valid)
        t = latest_version(t)
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
        # Items with a track row (chunk_index -1, issue 26): apart from the chunks' bookkeeping below.
        tracks = t.filter(pc.equal(t["chunk_index"], TRACK_INDEX))
        self._tracks: set[str] = set(pc.unique(tracks["id"]).to_pylist())
        t = t.filter(pc.not_equal(t["chunk_index"], TRACK_INDEX))
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
        # Keys with an error row and no successful row (a retry may have fixed some); track rows too.
        t = pa.concat_tables([t, tracks])
        errors = t.filter(pc.is_valid(t["error"]))
        error_keys = set(zip(errors["id"].to_pylist(), errors["chunk_index"].to_pylist(), strict=True))
        ok = t.filter(pc.and_(pc.is_null(t["error"]), pc.is_in(t["id"], value_set=pc.unique(errors["id"]))))
        ok_keys = set(zip(ok["id"].to_pylist(), ok["chunk_index"].to_pylist(), strict=True))
        self._failed_keys = error_keys - ok_keys
        self._failed: dict[str, set[int]] = {}
        for item_id, index in self._failed_keys:
            self._failed.setdefault(item_id, set()).add(index)
        self._gates(t)

    def _gates(self, t: pa.Table) -> None:
        """What the gates need: audio hash -> (id, chunk) of captioned chunks (the first row per hash; no
        captions: ``read_row`` fetches one when a duplicate needs it), and the silence-gated keys."""
        gated = pc.fill_null(pc.equal(t["gate"], "silence"), False)
        silent = t.filter(gated)
        silent_keys = set(zip(silent["id"].to_pylist(), silent["chunk_index"].to_pylist(), strict=True))
        if silent_keys:  # a gated row superseded by a caption (--keep-silence) is not silent any more
            later = t.filter(pc.and_(pc.invert(gated), pc.is_in(t["id"], value_set=pc.unique(silent["id"]))))
            silent_keys -= set(zip(later["id"].to_pylist(), later["chunk_index"].to_pylist(), strict=True))
        self._silent: dict[str, set[int]] = {}
        for item_id, index in silent_keys:
            self._silent.setdefault(item_id, set()).add(index)
        captioned = t.filter(
            pc.and_(pc.and_(pc.is_valid(t["audio_sha256"]), pc.is_null(t["gate"])), pc.is_null(t["error"]))
        )
        self._audio: dict[bytes, tuple[str, int]] = {}
        for sha, item_id, index in zip(
            captioned["audio_sha256"].to_pylist(),
            captioned["id"].to_pylist(),
            captioned["chunk_index"].to_pylist(),
            strict=True,
        ):
            with contextlib.suppress(ValueError):
                self._audio.setdefault(bytes.fromhex(sha)[:16], (item_id, int(index)))

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
        if chunk_index == TRACK_INDEX:
            return item_id in self._tracks
        n = self._done.get(item_id)
        if n is not None:
            return n == 0 or 0 <= chunk_index < n
        return chunk_index in self._partial.get(item_id, ())

    def track_missing(self, item_id: str) -> bool:
        """Every chunk of an item cut into several is written, but not its track row (a crash between
        them, or a run before track rows existed): only the track row is left to make."""
        return self._done.get(item_id, 0) > 1 and item_id not in self._tracks

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

    def audio_original(self, audio_sha256: str) -> tuple[str, int] | None:
        """The (id, chunk_index) of a captioned chunk with these decoded samples (the gates' duplicates)."""
        try:
            return self._audio.get(bytes.fromhex(audio_sha256)[:16])
        except ValueError:
            return None

    def silent_chunks(self, item_id: str) -> set[int]:
        """The item's chunk indexes whose row is a silence-gated outcome (``--keep-silence`` redoes them)."""
        return set(self._silent.get(item_id, ()))

    def silent_keys(self) -> set[tuple[str, int]]:
        """Every silence-gated (id, chunk_index)."""
        return {(i, c) for i, cs in self._silent.items() for c in cs}

    def source_version(self, item_id: str, source: Fingerprint | None, content_hash: bool = False) -> tuple[int, bool]:
        """The source_version the item's next rows get, and whether its source changed since.

        The version on disk (0 if none) while the file is what was captioned; one above it when it
        differs (``source_changed``; items written before versions were recorded never count as changed).
        """
        version = self.version(item_id) or 0
        if self.source_recorded(item_id) and source_changed(self.recorded_source(item_id), source, content_hash):
            return version + 1, True
        return version, False

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


def read_row(out: str | Path, run_key: str, item_id: str, chunk_index: int) -> dict | None:
    """The current row of (id, chunk_index) in run ``run_key`` as a dict (None when there is none): a
    duplicate's original, read only when one needs it."""
    dataset = run_dataset(out, run_key)
    if dataset is None:
        return None
    expr = (pc.field("id") == item_id) & (pc.field("chunk_index") == int(chunk_index))
    try:
        rows = current_rows(dataset.to_table(filter=expr)).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{run_location(out, run_key)}: cannot read the row of {item_id!r}: {exc}") from exc
    return rows[0] if rows else None


def with_source(item: AudioItem, content_hash: bool = False) -> AudioItem:
    """The item with its fingerprint in ``source``: taken now unless it has one (or an error instead)."""
    if item.error or item.source is not None:
        return item
    return dataclasses.replace(item, source=fingerprint(item, content_hash=content_hash))
