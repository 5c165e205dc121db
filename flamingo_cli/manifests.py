"""Manifest files as inputs: .txt, .csv, .tsv, .jsonl and .parquet lists of audio paths -> AudioItems,
and the one row -> AudioItem function every row-shaped input (manifest rows, HF dataset rows, lhotse
cuts: flamingo_cli/corpora.py) builds its items with.

A row that cannot be used becomes an AudioItem with ``error`` set; only a manifest that cannot be read
as a whole (no path column, unreadable header or schema) raises SourceError.

Row numbers in ``origin`` ("manifest:N"), placeholder ids and duplicate-id messages are line numbers for
the text manifests (.txt, .csv, .tsv, .jsonl; a CSV header is line 1) and 1-based row indices for Parquet.
"""

from __future__ import annotations

import csv
import json
import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_cli import remote
from flamingo_cli.errors import UsageError
from flamingo_cli.output.columns import arrow_kind, merge_kinds, value_kind
from flamingo_cli.records import AudioItem, SeenIds

MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".csv", ".tsv", ".jsonl", ".parquet"})

# Where a manifest keeps the audio path, in order of preference (NeMo uses audio_filepath).
PATH_COLUMNS = ("path", "audio_filepath", "file", "filename", "audio")
_KNOWN_COLUMNS = frozenset({"id", "prompt", "offset", "duration"})
_PARQUET_BATCH_ROWS = 4096
_JSONL_PROBE_LINES = 1000


class SourceError(UsageError):
    """A usage-level input problem (missing input, unreadable manifest); the message names the file."""


def manifest_ext(path: str) -> str:
    """ ".csv", ".jsonl", … (a ".gz" suffix is looked through: the text is gunzipped as it is read)."""
    name = remote.basename(path) if remote.is_url(path) else path
    stem, ext = os.path.splitext(name.lower())
    if ext == ".gz":
        ext = os.path.splitext(stem)[1]
        return ext if ext in (".txt", ".csv", ".tsv", ".jsonl") else ".gz"
    return ext


def _is_manifest(path: str) -> bool:
    return manifest_ext(path) in MANIFEST_EXTENSIONS


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
    ext = manifest_ext(path)
    if ext == ".txt":
        return _txt_rows(path)
    if ext in (".csv", ".tsv"):
        return _csv_rows(shown, path, "\t" if ext == ".tsv" else ",")
    if ext == ".jsonl":
        return _jsonl_rows(shown, path)
    return _parquet_rows(shown, path)


def probe_manifest(shown: str, path: str) -> None:
    """Open a manifest and read just enough (header, schema, first object) to know iter_items can use it."""
    ext = manifest_ext(path)
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


def _absent(value: Any) -> bool:
    """A cell that says nothing: missing, None or blank."""
    return value is None or (isinstance(value, str) and not value.strip())


def _seconds(value: Any, name: str) -> float | None:
    """Parse an offset/duration cell; None when absent. Raises ValueError with a row-ready message."""
    if _absent(value):
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


def row_item(
    row: Mapping[str, Any],
    path: str,
    origin: str,
    placeholder: str,
    *,
    column: str | None = None,
    error: str | None = None,
    data: bytes | None = None,
) -> AudioItem:
    """One row -> AudioItem, the fields every row-shaped input shares: the id (the row's ``id``, else
    ``placeholder``), ``offset``/``duration`` (checked), ``prompt``, and every other column but ``column``
    (where the audio is) passed through as ``extra``.

    ``error`` (the caller found the row unusable) or a bad offset/duration makes an error row: id, path,
    origin and the passthrough columns only (no segment, prompt or audio bytes).
    """
    extra = {k: v for k, v in row.items() if k != column and k not in _KNOWN_COLUMNS}
    item_id = _text(row.get("id")) or placeholder
    offset = duration = None
    if error is None:
        try:
            offset = _seconds(row.get("offset"), "offset")
            duration = _seconds(row.get("duration"), "duration")
        except ValueError as e:
            error = str(e)
    if error is not None:
        return AudioItem(id=item_id, path=path, origin=origin, extra=extra, error=error)
    return AudioItem(
        id=item_id,
        path=path,
        offset=offset or 0.0,
        duration=duration,
        prompt=_text(row.get("prompt")),
        extra=extra,
        origin=origin,
        data=data,
    )


def iter_manifest(shown: str, path: str) -> Iterator[AudioItem]:
    """Rows to AudioItems: resolve paths against the manifest folder, derive ids, flag bad rows and dupes."""
    base = remote.parent(path) if remote.is_url(path) else os.path.dirname(os.path.abspath(path))
    name = remote.basename(path) if remote.is_url(path) else os.path.basename(path)
    seen = SeenIds("row ")
    try:
        for n, row in _manifest_rows(shown, path):
            origin = f"{shown}:{n}"
            placeholder = f"{name}:row{n}"
            if isinstance(row, str):
                yield AudioItem(id=placeholder, path="", origin=origin, error=row)
                continue
            yield _manifest_item(row, base, placeholder, origin, n, seen)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"{shown}: cannot read manifest ({e})") from e


def _manifest_item(
    row: Mapping[str, Any], base: str, placeholder: str, origin: str, n: int, seen: SeenIds
) -> AudioItem:
    key = next((k for k in PATH_COLUMNS if k in row), None)
    raw_path = row.get(key) if key else None
    full = ""
    if isinstance(raw_path, str) and raw_path.strip():
        if remote.is_url(raw_path):
            full = raw_path
        elif remote.is_url(base):
            full = remote.join(base + "/", raw_path)
        else:
            full = os.path.abspath(os.path.join(base, os.path.expanduser(raw_path)))

    error = None
    if key is None:
        error = f"no path field (expected one of {', '.join(PATH_COLUMNS)})"
    elif _absent(raw_path):
        error = "empty path"
    elif not isinstance(raw_path, str):
        error = f"path is not a string: {raw_path!r}"
    item = row_item(row, full, origin, placeholder, column=key, error=error)
    if item.error is not None:
        return item
    if _text(row.get("id")) is None:  # segments of one file need distinct ids
        segment = not (_absent(row.get("offset")) and _absent(row.get("duration")))
        item = replace(item, id=f"{raw_path}@{item.offset!r}" if segment else raw_path)
    item = seen.check(item, n)
    if item.error is not None:
        return item

    try:
        if remote.is_url(full):  # no HEAD per row: the fingerprint and the decoder say if it is missing
            return item
        if stat.S_ISDIR(os.stat(full).st_mode):
            error = f"is a directory: {full}"
    except FileNotFoundError:
        error = f"{'broken symlink' if os.path.lexists(full) else 'file not found'}: {full}"
    except OSError as e:
        error = f"cannot access ({e.strerror}): {full}"
    return item if error is None else replace(item, error=error)


# --- the run's passthrough columns ---------------------------------------------------------------------

# How many rows of a JSONL manifest decide its columns' types (CSV has a header and only strings;
# Parquet has a schema).
DECLARE_ROWS = 1000


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
        path = os.fspath(raw)
        path = path if remote.is_url(path) else os.path.expanduser(path)
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
                        add(field.name, arrow_kind(field.type))
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
