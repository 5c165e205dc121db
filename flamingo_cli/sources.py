"""Turn input paths (directories, manifests, single files) into a lazy, deterministic stream of AudioItems.

Inputs may be local paths or URLs (``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``: see
flamingo_cli/remote.py), and besides folders and manifests, dataset formats (HF ``datasets``,
WebDataset shards, lhotse manifests: flamingo_cli/corpora.py); ``_kind`` tells them apart.

Nothing here decodes audio. Problems with one file or one manifest row become an AudioItem with
``error`` set, so a million-file run reports them instead of dying; only usage-level problems (an input
that does not exist, a manifest that cannot be read as a whole) raise SourceError.

Row numbers in ``origin`` ("manifest:N"), placeholder ids and duplicate-id messages are line numbers for
the text manifests (.txt, .csv, .tsv, .jsonl; a CSV header is line 1) and 1-based row indices for Parquet.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_cli import corpora, remote
from flamingo_cli.errors import UsageError
from flamingo_cli.paths import escape_path
from flamingo_cli.records import AudioItem

# What the decoders really open (audio.decode tries libsndfile, then FFmpeg through PyAV); a folder scan
# takes these by default and counts every other file it passes over (ScanStats). ``--ext all`` takes all.
SOUNDFILE_EXTENSIONS: frozenset[str] = frozenset(
    {".wav", ".wave", ".bwf", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".mp2", ".aif", ".aiff", ".aifc"}
    | {".au", ".snd", ".caf", ".w64", ".rf64", ".sph", ".voc"}
)
PYAV_EXTENSIONS: frozenset[str] = frozenset(
    {".m4a", ".m4b", ".mp4", ".3gp", ".aac", ".wma", ".webm", ".mka", ".amr", ".awb", ".ac3", ".dts"}
    | {".ape", ".wv", ".tta", ".mpc", ".spx", ".mpa"}
)
DEFAULT_EXTENSIONS: frozenset[str] = SOUNDFILE_EXTENSIONS | PYAV_EXTENSIONS
ALL_EXTENSIONS = "all"  # --ext all: try every file (what does not decode gets an error row)
NO_EXTENSION = "(none)"  # the ScanStats key of files without an extension
HIDDEN = "(hidden)"  # and of hidden files (".DS_Store", "._x.wav"), which a scan never takes
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".csv", ".tsv", ".jsonl", ".parquet"})

# Where a manifest keeps the audio path, in order of preference (NeMo uses audio_filepath).
PATH_COLUMNS = ("path", "audio_filepath", "file", "filename", "audio")
_KNOWN_COLUMNS = frozenset({"id", "prompt", "offset", "duration"})
_PARQUET_BATCH_ROWS = 4096
_JSONL_PROBE_LINES = 1000


class SourceError(UsageError):
    """A usage-level input problem (missing input, unreadable manifest); the message names the file."""


def _normalise_extensions(extensions: Collection[str] | None) -> tuple[str, ...] | None:
    """Accept {".wav"}, {"wav"} or {"WAV"} alike; a tuple so str.endswith can take it; None = every file."""
    if extensions is None:
        return tuple(sorted(DEFAULT_EXTENSIONS))
    if any(e.strip().lower() in (ALL_EXTENSIONS, "*") for e in extensions):
        return None
    out = {"." + e.strip().lower().lstrip(".") for e in extensions if e.strip().strip(".")}
    if not out:
        raise ValueError("extensions must name at least one extension")
    return tuple(sorted(out))


def _manifest_ext(path: str) -> str:
    """ ".csv", ".jsonl", … (a ".gz" suffix is looked through: the text is gunzipped as it is read)."""
    name = remote.basename(path) if remote.is_url(path) else path
    stem, ext = os.path.splitext(name.lower())
    if ext == ".gz":
        ext = os.path.splitext(stem)[1]
        return ext if ext in (".txt", ".csv", ".tsv", ".jsonl") else ".gz"
    return ext


def _is_manifest(path: str) -> bool:
    return _manifest_ext(path) in MANIFEST_EXTENSIONS


def _input_path(raw: str | Path) -> str:
    text = os.fspath(raw)
    return text if remote.is_url(text) or corpora.hf_kind(text) else os.path.expanduser(text)


def _shown(raw: str | Path) -> str:
    text = os.fspath(raw)
    return remote.redact(text) if remote.is_url(text) else text


def _missing_input(raw: str | Path, path: str) -> SourceError:
    if remote.is_url(path):
        return SourceError(f"{_shown(raw)}: input not found (no such object or prefix)")
    reason = "broken symlink" if os.path.lexists(path) else "no such file or directory"
    return SourceError(f"{raw}: input not found ({reason})")


def _stat(raw: str | Path, path: str) -> tuple[bool, bool]:
    """(exists, is a directory), local or remote; a store that refuses (credentials) is a SourceError."""
    if not remote.is_url(path):
        return os.path.exists(path), os.path.isdir(path)
    try:
        return remote.exists(path)
    except OSError as e:
        raise SourceError(f"{_shown(raw)}: cannot access ({remote.redact(str(e)) or type(e).__name__})") from e
    except Exception as e:  # botocore's NoCredentialsError and friends are not OSErrors
        raise SourceError(f"{_shown(raw)}: cannot access ({type(e).__name__}: {remote.redact(str(e))})") from e


def _is_parquet_dataset(path: str) -> bool:
    """A Parquet file whose audio column holds embedded audio (struct of bytes/path, HF's Audio)."""
    if _manifest_ext(path) != ".parquet":
        return False
    try:
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(remote.open_binary(path)) if remote.is_url(path) else path
            schema = pq.read_schema(src)
    except Exception:
        return False  # the manifest reader reports it
    for name in PATH_COLUMNS:
        if name in schema.names:
            typ = schema.field(name).type
            return pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0
    return False


def _kind(raw: str | Path, path: str) -> str:
    """What an input is: dir, manifest, file, hf, wds (WebDataset shard) or lhotse. Raises when missing."""
    if corpora.hf_kind(path):
        return "hf"
    exists, is_dir = _stat(raw, path)
    if not exists:
        raise _missing_input(raw, path)
    if is_dir:
        return "hf" if corpora.is_saved_dataset(path) else "dir"
    if corpora.is_tar(path):
        return "wds"
    ext = _manifest_ext(path)
    if ext == ".jsonl":
        try:
            if corpora.is_lhotse_row(corpora.first_object(path)):
                return "lhotse"
        except (OSError, EOFError, UnicodeError):
            pass  # the manifest reader says what is wrong
        return "manifest"
    if ext == ".parquet" and _is_parquet_dataset(path):
        return "hf"
    return "manifest" if ext in MANIFEST_EXTENSIONS else "file"


def check_inputs(inputs: Iterable[str | Path]) -> None:
    """Fail fast, before a model loads: every input exists; every manifest opens and has a path column."""
    for raw in inputs:
        path = _input_path(raw)
        kind = _kind(raw, path)
        try:
            if kind == "hf":
                corpora.probe_hf(_shown(raw), path)
            elif kind == "wds":
                corpora.probe_webdataset(_shown(raw), path)
            elif kind == "lhotse":
                pass  # _kind read its first object
            elif remote.is_url(path):
                if kind == "manifest":
                    _probe_manifest(_shown(raw), path)
            elif kind == "dir":
                if not os.access(path, os.R_OK | os.X_OK):  # not a listing: the run's one walk lists it
                    raise SourceError(f"{raw}: cannot read directory ({os.strerror(errno.EACCES)})")
            elif kind == "manifest":
                _probe_manifest(str(raw), path)
            elif not os.access(path, os.R_OK):
                raise SourceError(f"{raw}: file is not readable")
        except corpora.CorpusError as e:
            raise SourceError(str(e)) from e
        except OSError as e:
            raise SourceError(f"{_shown(raw)}: cannot read ({remote.redact(str(e)) or type(e).__name__})") from e


class ScanStats:
    """The regular files folder scans passed over (not a wanted extension), counted by extension.

    Thread-safe: the producer's scan adds while the live display and the summary read. ``finished`` is
    set once iter_items has read every input, so a reader knows the counts are complete.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._skipped: Counter[str] = Counter()
        self.finished = False

    def skip(self, name: str) -> None:
        key = HIDDEN if name.startswith(".") else (os.path.splitext(name)[1].lower() or NO_EXTENSION)
        with self._lock:
            self._skipped[escape_path(key)] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._skipped.values())

    def skipped(self) -> dict[str, int]:
        """A snapshot, most frequent first: {".xyz": 8, ".txt": 3}."""
        with self._lock:
            return dict(sorted(self._skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_skipped(counts: Mapping[str, int], limit: int = 8) -> str:
    """``skipped 11 files: .xyz ×8, .txt ×3`` ("" when nothing was skipped)."""
    total = sum(counts.values())
    if not total:
        return ""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{ext} ×{n}" for ext, n in ordered[:limit]]
    if len(ordered) > limit:
        parts.append(f"{len(ordered) - limit} more kinds ×{sum(n for _, n in ordered[limit:])}")
    return f"skipped {total} file{'s' if total != 1 else ''}: {', '.join(parts)}"


def iter_items(
    inputs: Sequence[str | Path],
    extensions: Collection[str] | None = None,
    with_data: bool = True,
    stats: ScanStats | None = None,
) -> Iterator[AudioItem]:
    """Yield AudioItems for every input in order; `extensions` filters folder scans and shard members.

    ``with_data=False`` is for counting: dataset inputs leave their audio bytes unread (``data`` None).
    ``stats`` (optional) counts the files folder scans pass over; ``stats.finished`` is set at the end."""
    exts = _normalise_extensions(extensions)
    for raw in inputs:
        path = _input_path(raw)
        shown = _shown(raw)
        kind = _kind(raw, path)
        try:
            if kind == "hf":
                yield from corpora.iter_hf(shown, path, with_data)
            elif kind == "wds":
                yield from corpora.iter_webdataset(shown, path, exts or tuple(sorted(DEFAULT_EXTENSIONS)), with_data)
            elif kind == "lhotse":
                yield from corpora.iter_lhotse(shown, path)
            elif kind == "dir":
                scan = _scan_remote if remote.is_url(path) else _scan_dir
                yield from scan(shown, path, exts, stats)
            elif kind == "manifest":
                yield from _iter_manifest(shown, path)
            elif remote.is_url(path):
                yield AudioItem(id=remote.basename(path), path=path, origin=shown)
            else:
                full = os.path.abspath(path)
                yield AudioItem(id=escape_path(os.path.basename(full)), path=full, origin=shown)
        except corpora.CorpusError as e:
            raise SourceError(str(e)) from e
    if stats is not None:
        stats.finished = True


# --- static sharding ---------------------------------------------------------------------------------


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` (0-based, as SLURM array task ids) -> ``(i, N)``; raises SourceError when malformed."""
    index, sep, count = spec.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise SourceError(f"--shard {spec!r}: expected i/N with 0 <= i < N, e.g. 0/4 ... 3/4")
    return i, n


def shard_of(item_id: str, count: int) -> int:
    """Which of ``count`` shards owns ``item_id``: a stable hash, the same on every host and Python."""
    digest = hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(items: Iterable[AudioItem], index: int, count: int) -> Iterator[AudioItem]:
    """The items of shard ``index`` of ``count``, by id: every host can list the same inputs and
    take its share without talking to the others, and an id (with its duplicates) lands in one shard."""
    for item in items:
        if count == 1 or shard_of(item.id, count) == index:
            yield item


# --- change detection ------------------------------------------------------------------------------

_HASH_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a source file looked like when it was captioned: size and mtime, and sha256 with --hash."""

    size: int
    mtime_ns: int
    sha256: str | None = None


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


def with_source(item: AudioItem, content_hash: bool = False) -> AudioItem:
    """The item with its fingerprint in ``source``: taken now unless it has one (or an error instead)."""
    if item.error or item.source is not None:
        return item
    return dataclasses.replace(item, source=fingerprint(item, content_hash=content_hash))


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


# --- directories -----------------------------------------------------------------------------------------


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()  # follows symlinks
    except OSError:
        return False


def _listing(path: str, stats: ScanStats | None = None) -> list[tuple[str, os.DirEntry[str], bool]]:
    """One directory's visible entries, sorted so that a depth-first walk yields sorted relative paths.

    Directories sort as "name/" so "a/x.wav" and "a-b.wav" come out in plain string order. Hidden
    regular files are counted in ``stats`` (hidden folders are not entered, so not counted).
    """
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if not e.name.startswith("."):
                entries.append((e, _is_dir(e)))
            elif stats is not None and _is_file(e):
                stats.skip(e.name)
    keyed = [(e.name + "/" if is_dir else e.name, e, is_dir) for e, is_dir in entries]
    keyed.sort(key=lambda t: t[0])
    return keyed


def _scan_remote(
    shown: str, url: str, exts: tuple[str, ...] | None, stats: ScanStats | None = None
) -> Iterator[AudioItem]:
    """A remote folder: ids are relative paths, in the same sorted order as a local scan."""
    try:
        listed = list(remote.walk_files(url))
    except Exception as e:
        raise SourceError(f"{shown}: cannot list ({type(e).__name__}: {remote.redact(str(e))})") from e
    for rel, full in listed:
        if exts is None or rel.lower().endswith(exts):
            yield AudioItem(id=rel, path=full, origin=shown)
        elif stats is not None:
            stats.skip(rel.rsplit("/", 1)[-1])


def _scan_dir(
    shown: str, root: str, exts: tuple[str, ...] | None, stats: ScanStats | None = None
) -> Iterator[AudioItem]:
    """Recursive, sorted, lazy walk that follows directory symlinks but visits each real directory once.

    ``exts`` None takes every file. Ids are escape_path()-ed relative paths; ``path`` keeps the real name.
    """
    root = os.path.abspath(root)
    try:
        root_st = os.stat(root)
        stack = [("", iter(_listing(root, stats)))]
    except OSError as e:
        raise SourceError(f"{shown}: cannot read directory ({e.strerror})") from e
    visited = {(root_st.st_dev, root_st.st_ino)}

    def bad(rel: str, full: str, reason: str) -> AudioItem:
        return AudioItem(id=escape_path(rel), path=full, origin=shown, error=f"{reason}: {escape_path(full)}")

    while stack:
        prefix, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        _, entry, is_dir = nxt
        rel, full = prefix + entry.name, entry.path
        wanted = exts is None or entry.name.lower().endswith(exts)
        if is_dir:
            if wanted and exts is not None:  # e.g. "take1.wav/": surely not meant, so say so (and descend)
                yield bad(rel, full, "is a directory")
            try:
                st = entry.stat()
                key = (st.st_dev, st.st_ino)
                if key in visited:  # symlink loop, or a second link to a directory already scanned
                    continue
                visited.add(key)
                stack.append((rel + "/", iter(_listing(full, stats))))
            except OSError as e:
                yield bad(rel, full, f"cannot read directory ({e.strerror})")
            continue
        is_file = _is_file(entry)
        if not wanted:
            if is_file and stats is not None:
                stats.skip(entry.name)
            continue
        if is_file:
            yield AudioItem(id=escape_path(rel), path=full, origin=shown)
        elif entry.is_symlink() and not os.path.exists(full):
            yield bad(rel, full, "broken symlink")
        else:
            yield bad(rel, full, "not a regular file")


# --- manifests -------------------------------------------------------------------------------------------

# A manifest yields (row number, row mapping) or (row number, reason the row is unusable).
_Rows = Iterator[tuple[int, Mapping[str, Any] | str]]


def _undecodable(text: str) -> bool:
    """True if the text holds bytes that were not UTF-8 (kept as lone surrogates by surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _open_text(path: str, newline: str | None = None) -> TextIO:
    # utf-8-sig drops a BOM; surrogateescape turns bad bytes into a per-row error instead of a crash.
    if remote.is_url(path) or path.endswith(".gz"):
        import fsspec

        opened = fsspec.open(
            path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline=newline, compression="infer"
        )
        return opened.open()
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _path_column(shown: str, columns: Sequence[str]) -> str:
    for name in PATH_COLUMNS:
        if name in columns:
            return name
    raise SourceError(
        f"{shown}: no path column (expected one of {', '.join(PATH_COLUMNS)}; found {', '.join(columns)})"
    )


def _csv_header(shown: str, reader: Iterator[list[str]]) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise SourceError(f"{shown}: empty manifest (a header row is required)") from None
    except csv.Error as e:
        raise SourceError(f"{shown}: cannot parse header ({e})") from e
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise SourceError(f"{shown}: duplicate column(s) {', '.join(dupes)}")
    _path_column(shown, header)
    return header


def _csv_rows(shown: str, path: str, delimiter: str) -> _Rows:
    with _open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = _csv_header(shown, reader)
        last_error_line = -1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # the reader moves on past the bad record; guard against no progress
                if reader.line_num == last_error_line:
                    raise SourceError(f"{shown}:{reader.line_num}: cannot parse ({e})") from e
                last_error_line = reader.line_num
                yield reader.line_num, f"cannot parse row ({e})"
                continue
            if not row:
                continue
            if len(row) != len(header):
                yield reader.line_num, f"expected {len(header)} fields, got {len(row)}"
            elif any(_undecodable(v) for v in row):
                yield reader.line_num, "row is not valid UTF-8"
            else:
                yield reader.line_num, dict(zip(header, row, strict=True))


def _txt_rows(path: str) -> _Rows:
    """One path per line; surrounding whitespace is dropped; blank lines and '#' comments are skipped."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            yield n, ("line is not valid UTF-8" if _undecodable(text) else {"path": text})


def _json_row(line: str) -> Mapping[str, Any] | str:
    if _undecodable(line):
        return "line is not valid UTF-8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno})"
    return obj if isinstance(obj, dict) else f"not a JSON object ({type(obj).__name__})"


def _jsonl_rows(shown: str, path: str) -> _Rows:
    first = True
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _json_row(line)
            if first and not isinstance(row, str):
                _path_column(shown, list(row))  # the first object stands in for a header
                first = False
            yield n, row


def _open_parquet(shown: str, path: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(remote.open_binary(path) if remote.is_url(path) else path)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{shown}: cannot read Parquet ({e})") from e
    schema = pf.schema_arrow
    col = _path_column(shown, schema.names)
    typ = schema.field(col).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)):
        pf.close()
        raise SourceError(
            f"{shown}: path column '{col}' has type {typ}, expected strings (for embedded audio: an Audio"
            " column of bytes/path structs, read as an HF dataset)"
        )
    return pf


def _parquet_rows(shown: str, path: str) -> _Rows:
    """Record batches, so a million-row manifest never sits in memory whole."""
    with _open_parquet(shown, path) as pf:
        n = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                n += 1
                yield n, row


def _manifest_rows(shown: str, path: str) -> _Rows:
    ext = _manifest_ext(path)
    if ext == ".txt":
        return _txt_rows(path)
    if ext in (".csv", ".tsv"):
        return _csv_rows(shown, path, "\t" if ext == ".tsv" else ",")
    if ext == ".jsonl":
        return _jsonl_rows(shown, path)
    return _parquet_rows(shown, path)


def _probe_manifest(shown: str, path: str) -> None:
    """Open a manifest and read just enough (header, schema, first object) to know iter_items can use it."""
    ext = _manifest_ext(path)
    try:
        if ext in (".csv", ".tsv"):
            with _open_text(path, newline="") as f:
                _csv_header(shown, csv.reader(f, delimiter="\t" if ext == ".tsv" else ","))
        elif ext == ".jsonl":
            with _open_text(path) as f:
                for _, line in zip(range(_JSONL_PROBE_LINES), f, strict=False):
                    row = _json_row(line) if line.strip() else "blank"
                    if not isinstance(row, str):
                        _path_column(shown, list(row))
                        break
        elif ext == ".parquet":
            _open_parquet(shown, path).close()
        else:
            with _open_text(path) as f:
                f.read(1)
    except OSError as e:
        raise SourceError(f"{shown}: cannot read manifest ({e.strerror or remote.redact(str(e))})") from e


def _seconds(value: Any, name: str) -> float | None:
    """Parse an offset/duration cell; None when absent. Raises ValueError with a row-ready message."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} is not a number: {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not a number: {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0: {value!r}")
    if name == "duration" and x == 0:
        raise ValueError("duration must be > 0")
    return x


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _iter_manifest(shown: str, path: str) -> Iterator[AudioItem]:
    """Rows to AudioItems: resolve paths against the manifest folder, derive ids, flag bad rows and dupes."""
    base = remote.parent(path) if remote.is_url(path) else os.path.dirname(os.path.abspath(path))
    name = remote.basename(path) if remote.is_url(path) else os.path.basename(path)
    seen: dict[str, int] = {}
    try:
        for n, row in _manifest_rows(shown, path):
            origin = f"{shown}:{n}"
            placeholder = f"{name}:row{n}"
            if isinstance(row, str):
                yield AudioItem(id=placeholder, path="", origin=origin, error=row)
                continue
            yield _row_item(row, base, placeholder, origin, n, seen)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{shown}: cannot read manifest ({e})") from e


def _row_item(
    row: Mapping[str, Any], base: str, placeholder: str, origin: str, n: int, seen: dict[str, int]
) -> AudioItem:
    key = next((k for k in PATH_COLUMNS if k in row), None)
    extra = {k: v for k, v in row.items() if k != key and k not in _KNOWN_COLUMNS}
    given_id = _text(row.get("id"))
    raw_path = row.get(key) if key else None
    full = ""
    if isinstance(raw_path, str) and raw_path.strip():
        if remote.is_url(raw_path):
            full = raw_path
        elif remote.is_url(base):
            full = remote.join(base + "/", raw_path)
        else:
            full = os.path.abspath(os.path.join(base, os.path.expanduser(raw_path)))

    def bad(reason: str, item_id: str | None = None) -> AudioItem:
        return AudioItem(id=item_id or given_id or placeholder, path=full, origin=origin, extra=extra, error=reason)

    if key is None:
        return bad(f"no path field (expected one of {', '.join(PATH_COLUMNS)})")
    if raw_path is None or (isinstance(raw_path, str) and not raw_path.strip()):
        return bad("empty path")
    if not isinstance(raw_path, str):
        return bad(f"path is not a string: {raw_path!r}")
    try:
        offset = _seconds(row.get("offset"), "offset")
        duration = _seconds(row.get("duration"), "duration")
    except ValueError as e:
        return bad(str(e))

    if given_id is not None:
        item_id = given_id
    elif offset is not None or duration is not None:
        item_id = f"{raw_path}@{(offset or 0.0)!r}"  # segments of one file need distinct ids
    else:
        item_id = raw_path
    if item_id in seen:
        return bad(f"duplicate id {item_id!r} (first at row {seen[item_id]})", item_id)
    seen[item_id] = n

    error = None
    try:
        if remote.is_url(full):  # no HEAD per row: the fingerprint and the decoder say if it is missing
            pass
        elif stat.S_ISDIR(os.stat(full).st_mode):
            error = f"is a directory: {full}"
    except FileNotFoundError:
        error = f"{'broken symlink' if os.path.lexists(full) else 'file not found'}: {full}"
    except OSError as e:
        error = f"cannot access ({e.strerror}): {full}"
    return AudioItem(
        id=item_id,
        path=full,
        offset=offset or 0.0,
        duration=duration,
        prompt=_text(row.get("prompt")),
        extra=extra,
        origin=origin,
        error=error,
    )


# --- the run's passthrough columns ---------------------------------------------------------------------

# How many rows of a JSONL manifest decide its columns' types (CSV has a header and only strings;
# Parquet has a schema).
DECLARE_ROWS = 1000


def value_kind(value: Any) -> str | None:
    """The column type one passthrough value asks for: string, int64, float64, bool; json for the rest."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(2**63) <= value < 2**63 else "json"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalars
        return value_kind(value.item())
    return "json"


def merge_kinds(kinds: Iterable[str | None]) -> str | None:
    """One column type for a set of value kinds: ints with floats are float64, any other mix is string."""
    found = {k for k in kinds if k is not None}
    if not found:
        return None
    if len(found) == 1 and "json" not in found:
        return found.pop()
    if found <= {"int64", "float64"}:
        return "float64"
    return "string"


def _arrow_kind(typ: pa.DataType) -> str:
    if pa.types.is_boolean(typ):
        return "bool"
    if pa.types.is_integer(typ) and not (pa.types.is_uint64(typ)):
        return "int64"
    if pa.types.is_floating(typ):
        return "float64"
    return "string"


def declared_columns(inputs: Sequence[str | Path], rows: int = DECLARE_ROWS) -> dict[str, str]:
    """The passthrough columns a run writes, {manifest key: type}, decided before its first part.

    Read from every manifest input: a CSV/TSV header (all strings), a Parquet schema, the keys and
    values of a JSONL manifest's first ``rows`` objects (a key only seen later is not declared; its
    values go to the ``warnings`` column). Folders, single files and .txt manifests declare nothing.
    A key two manifests type differently is float64 (ints and floats) or string. Types: string,
    int64, float64, bool. Inputs that cannot be read declare nothing here (check_inputs reports them).
    """
    kinds: dict[str, list[str | None]] = {}

    def add(key: str, kind: str | None) -> None:
        kinds.setdefault(key, []).append(kind)

    for raw in inputs:
        path = _input_path(raw)
        if not os.path.isfile(path) or not _is_manifest(path):
            continue
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext in (".csv", ".tsv"):
                with _open_text(path, newline="") as f:
                    header = _csv_header(str(raw), csv.reader(f, delimiter="\t" if ext == ".tsv" else ","))
                key = next((k for k in PATH_COLUMNS if k in header), None)
                for name in header:
                    if name != key and name not in _KNOWN_COLUMNS:
                        add(name, "string")
            elif ext == ".parquet":
                with _open_parquet(str(raw), path) as pf:
                    schema = pf.schema_arrow
                key = next((k for k in PATH_COLUMNS if k in schema.names), None)
                for field in schema:
                    if field.name != key and field.name not in _KNOWN_COLUMNS:
                        add(field.name, _arrow_kind(field.type))
            elif ext == ".jsonl":
                for n, (_, row) in enumerate(_jsonl_rows(str(raw), path)):
                    if n >= rows:
                        break
                    if isinstance(row, str):
                        continue
                    key = next((k for k in PATH_COLUMNS if k in row), None)
                    for name, value in row.items():
                        if name != key and name not in _KNOWN_COLUMNS:
                            add(name, value_kind(value))
        except (OSError, SourceError, pa.ArrowException):
            continue
    return {k: merge_kinds(v) or "string" for k, v in kinds.items()}
