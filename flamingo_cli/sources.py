"""Turn input paths (directories, manifests, single files) into a lazy, deterministic stream of AudioItems.

One job: tell inputs apart (``_kind``), check them before a model loads, walk folders, and hand each
input to its reader: manifests (flamingo_cli/manifests.py), dataset formats (HF ``datasets``,
WebDataset shards, lhotse manifests: flamingo_cli/corpora.py); then the static ``--shard`` split.
Inputs may be local paths or URLs (``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``: see
flamingo_cli/remote.py).

Nothing here decodes audio. Problems with one file or one manifest row become an AudioItem with
``error`` set, so a million-file run reports them instead of dying; only usage-level problems (an input
that does not exist, a manifest that cannot be read as a whole) raise SourceError.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_cli import corpora, remote
from flamingo_cli.manifests import (  # the underscored ones: declared_columns reads manifest headers with them
    MANIFEST_EXTENSIONS,
    PATH_COLUMNS,
    SourceError,
    iter_manifest,
    manifest_ext,
    probe_manifest,
)
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
    if manifest_ext(path) != ".parquet":
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
    ext = manifest_ext(path)
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
                    probe_manifest(_shown(raw), path)
            elif kind == "dir":
                if not os.access(path, os.R_OK | os.X_OK):  # not a listing: the run's one walk lists it
                    raise SourceError(f"{raw}: cannot read directory ({os.strerror(errno.EACCES)})")
            elif kind == "manifest":
                probe_manifest(str(raw), path)
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
                yield from iter_manifest(shown, path)
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
