"""``flamingo browse OUT``: the data of the static report, written page by page.

The report is a folder (default ``OUT/_browse``; a leading ``_`` keeps dataset readers out of it):

    index.html            the summary (runs, counts, plots as inline SVG: readable without JavaScript)
                          and the rows table, which pages through the files below
    data/meta.js          flamingoMeta({...}): columns, row count, pages, runs, filters
    data/p/<n>.js         flamingoPage(n, [[...], ...]): PAGE_ROWS current rows each, as arrays
    data/f/<filter>/<k>.js flamingoIndex(id, k, [...]): a filter's row numbers, INDEX_ROWS per file
    sources.txt           the local audio files the rows name (what ``--serve`` may send)

Pages are ``.js`` files loaded by ``<script>`` tags (Chromium refuses ``fetch()`` of ``file://``), so the
report opens from ``file://`` with no server and no network. The rows are ``layout.current_rows`` of every
run (the same rows ``flamingo inspect`` counts and ``flamingo export`` writes), ordered by run, id and
chunk; each run is read as one Arrow table and turned into Python values one page at a time. Filters
(errors, each flag, each run, each value of a low-cardinality column) are lists of row numbers
computed here, so the page never scans the rows for them; text search does scan, page by page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo_cli.errors import OutputError, UsageError

PAGE_ROWS = 250
INDEX_ROWS = 10_000
MARKER = ".flamingo-browse"
# Columns the rows leave out: model, task and prompt are the run's (its key hashes them; the runs table and
# the run's settings show them), the rest is bookkeeping.
HIDDEN = frozenset(
    ["model", "task", "prompt", "path_bytes", "source_size", "source_mtime_ns", "source_sha256", "source_version"]
)
# Columns never offered as a "field value" filter (free text, keys, numbers).
NOT_FACETS = frozenset(
    [
        "run",
        "id",
        "path",
        "caption",
        "reasoning",
        "error",
        "warnings",
        "created_at",
        "caption_json",
        "flags",
        "duplicate_of",
        "audio_sha256",
        "segments",
        "speech_segments",
        "prompt",
        "model",
        "task",
    ]
)
MAX_FACET_VALUES = 30
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class BrowseError(UsageError):
    """OUT is not a flamingo output, or the report folder is not one flamingo may write."""


@dataclass
class BrowseReport:
    """What ``build_report`` wrote."""

    out: str
    folder: Path
    rows: int
    pages: int
    filters: int
    bytes: int

    @property
    def index(self) -> Path:
        return self.folder / "index.html"

    @property
    def url(self) -> str:
        return self.index.resolve().as_uri()


def default_folder(out: str | Path) -> Path:
    """``OUT/_browse`` for a local OUT; ``./browse-<last name>`` for an object-store URL."""
    text = str(out)
    if _URL.match(text):
        return Path.cwd() / f"browse-{text.rstrip('/').rsplit('/', 1)[-1] or 'out'}"
    return Path(out) / "_browse"


def _js(call: str, *args: Any) -> str:
    body = ",".join(json.dumps(a, ensure_ascii=False, separators=(",", ":"), default=str) for a in args)
    return f"{call}({body});\n"


class _Filters:
    """Row-number lists per filter, gathered while the pages are written."""

    def __init__(self) -> None:
        self.errors = array("q")
        self.flags: dict[str, array] = {}
        self.facets: dict[str, dict[Any, array]] = {}
        self.dropped: set[str] = set()

    def facet(self, column: str, values: list[Any], base: int) -> None:
        if column in self.dropped:
            return
        groups = self.facets.setdefault(column, {})
        for i, v in enumerate(values):
            for x in v if isinstance(v, list) else [v]:
                if x is None or isinstance(x, dict | list) or x == "":
                    continue
                rows = groups.get(x)
                if rows is None:
                    if len(groups) >= MAX_FACET_VALUES:
                        self.dropped.add(column)
                        del self.facets[column]
                        return
                    rows = groups[x] = array("q")
                rows.append(base + i)


class _Stats:
    """What the plots draw, gathered while the pages are written."""

    def __init__(self) -> None:
        self.item_seconds: list[Any] = []
        self.chunk_seconds: list[Any] = []
        self.output_tokens: list[Any] = []
        self.prompt_tokens: list[Any] = []
        self.extensions: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()
        self.created: dict[str, list[Any]] = {}


def _current_order(dataset: Any) -> Any:
    """Row numbers (in the run's dataset order) of the current rows, sorted by id and chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flamingo_cli.output.layout import current_rows

    keys = dataset.to_table(columns=["id", "chunk_index", "created_at", "source_version"])
    keys = keys.append_column("_row", pa.array(range(keys.num_rows), pa.int64()))
    cur = current_rows(keys)
    order = pc.sort_indices(cur, sort_keys=[("id", "ascending"), ("chunk_index", "ascending")])
    return cur["_row"].take(order)


def _plain(column: Any) -> Any:
    """An Arrow column as JSON-ready Python values (timestamps as ISO text, bytes left out)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_timestamp(t):
        return pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ").to_pylist()
    return column.to_pylist()


def _write_pages(out: str | Path, keys: list[str], data: Path, stats: _Stats, filters: _Filters) -> dict[str, Any]:
    """Every run's current rows as page files; the columns, runs and sources they hold."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from flamingo_cli.output.layout import run_dataset

    datasets = {}
    columns: list[str] = ["run"]
    kinds: dict[str, str] = {}
    for key in keys:
        dataset = run_dataset(out, key)
        if dataset is None:
            continue
        datasets[key] = dataset
        for f in dataset.schema:
            if f.name in HIDDEN or pa.types.is_binary(f.type) or f.name in columns:
                continue
            columns.append(f.name)
            kinds[f.name] = str(f.type)
    (data / "p").mkdir(parents=True)
    runs, sources = [], set()
    page: list[list[Any]] = []
    n_pages = total = 0

    def flush() -> None:
        nonlocal page, n_pages  # a page may hold the end of one run and the start of the next
        (data / "p" / f"{n_pages}.js").write_text(_js("flamingoPage", n_pages, page), encoding="utf-8")
        n_pages, page = n_pages + 1, []

    for key, dataset in datasets.items():
        try:
            order = _current_order(dataset)
            names = [c for c in columns if c in dataset.schema.names]
            # Sorted once (take on a many-chunk table per page would copy the whole table each time).
            table = dataset.to_table(columns=names).take(order)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{out}: cannot read run {key}: {exc}") from exc
        runs.append({"run": key, "start": total, "rows": len(order)})
        pos = 0
        while pos < len(order):
            take = min(PAGE_ROWS - len(page), len(order) - pos)
            sub = table.slice(pos, take)
            base = total + pos
            values = {c: _plain(sub[c]) for c in names}
            values["run"] = [key] * take
            cols = [values.get(c, [None] * take) for c in columns]
            page.extend(map(list, zip(*cols, strict=True)))
            _gather(sub, values, base, key, stats, filters, kinds, sources, np, pc)
            pos += take
            if len(page) == PAGE_ROWS:
                flush()
        total += len(order)
    if page or n_pages == 0:
        flush()
    return {"columns": columns, "kinds": kinds, "runs": runs, "rows": total, "pages": n_pages, "sources": sources}


def _gather(sub, values, base, key, stats, filters, kinds, sources, np, pc) -> None:
    """One slice's share of the plots and the filters."""
    n = sub.num_rows
    errors = values.get("error") or [None] * n
    filters.errors.extend(base + i for i, e in enumerate(errors) if e is not None)
    for i, fl in enumerate(values.get("flags") or ()):
        for flag in fl or ():
            filters.flags.setdefault(flag, array("q")).append(base + i)
            stats.flags[flag] += 1
    for column, kind in kinds.items():
        if column in NOT_FACETS or column.startswith("_") or column not in values:
            continue
        if kind in ("string", "large_string", "bool", "list<item: string>", "list<element: string>"):
            filters.facet(column, values[column], base)
    paths, chunk_index = values.get("path") or [None] * n, values.get("chunk_index") or [None] * n
    for path, ci in zip(paths, chunk_index, strict=True):
        if not path:
            continue
        if not _URL.match(path):
            sources.add(path)
        if ci == 0:
            name = path.rsplit("/", 1)[-1]
            stats.extensions[name.rsplit(".", 1)[-1].lower() if "." in name else "(none)"] += 1
    names = sub.column_names
    if "duration_s" in names and "chunk_index" in names:
        first = pc.equal(sub["chunk_index"], 0)
        stats.item_seconds.append(sub["duration_s"].filter(first).drop_null().to_numpy(zero_copy_only=False))
    # The per-chunk plots leave track rows out (chunk_index -1: the whole item, a text-only request), as
    # inspect's chunk counts do.
    from flamingo_cli.records import TRACK_INDEX

    chunks = sub
    if "chunk_index" in names:
        chunks = sub.filter(pc.fill_null(pc.not_equal(sub["chunk_index"], TRACK_INDEX), True))
    if "start_s" in names and "end_s" in names:
        lengths = pc.subtract(chunks["end_s"], chunks["start_s"])
        stats.chunk_seconds.append(lengths.drop_null().to_numpy(zero_copy_only=False))
    for col, into in (("output_tokens", stats.output_tokens), ("prompt_tokens", stats.prompt_tokens)):
        if col in names:
            into.append(chunks[col].drop_null().to_numpy(zero_copy_only=False).astype(np.float64))
    if "created_at" in names:
        ts = sub["created_at"].drop_null()
        stats.created.setdefault(key, []).append(ts.cast("int64").to_numpy(zero_copy_only=False))


def _write_filters(data: Path, filters: _Filters, flags_present: bool) -> list[dict[str, Any]]:
    """Each filter's row numbers as index files; the filter list for meta.js."""
    out: list[dict[str, Any]] = []

    def write(label: str, kind: str, rows: array, **more: Any) -> None:
        fid = f"f{len(out)}"
        folder = data / "f" / fid
        folder.mkdir(parents=True)
        chunks = 0
        for k in range(0, len(rows), INDEX_ROWS):
            (folder / f"{chunks}.js").write_text(_js("flamingoIndex", fid, chunks, rows[k : k + INDEX_ROWS].tolist()))
            chunks += 1
        out.append({"id": fid, "label": label, "kind": kind, "count": len(rows), "chunks": chunks, **more})

    write("errors only", "errors", filters.errors)
    if flags_present:
        write("flagged (any flag)", "flagged", array("q", sorted({r for a in filters.flags.values() for r in a})))
    for flag in sorted(filters.flags):
        write(f"flag: {flag}", "flag", filters.flags[flag], value=flag)
    for column in sorted(filters.facets):
        groups = filters.facets[column]
        if len(groups) < 2:
            continue
        for value in sorted(groups, key=str):
            write(f"{column} = {value}", "field", groups[value], column=column, value=value)
    return out


def build_report(out: str | Path, to: str | Path | None = None) -> BrowseReport:
    """Write the static report of OUT's current rows into ``to`` (default ``default_folder(out)``).

    A folder ``to`` that exists must be empty or an earlier report (it is replaced); anything else is
    refused. Raises ``BrowseError`` (exit 2) when OUT is not a flamingo output, ``OutputError`` (4)
    when the report cannot be written.
    """
    from flamingo_cli.browse.html import render_index
    from flamingo_cli.browse.plots import plots
    from flamingo_cli.inspect import InspectError, inspect_output
    from flamingo_cli.output import layout

    try:
        doc = inspect_output(out, samples=0)
    except InspectError as exc:
        raise BrowseError(str(exc)) from exc
    folder = Path(to) if to is not None else default_folder(out)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).exists())):
        raise BrowseError(f"{folder}: exists and is not an earlier flamingo browse report; choose another --to")
    work = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(work, ignore_errors=True)
        (work / "data").mkdir(parents=True)
        stats, filters = _Stats(), _Filters()
        pages = _write_pages(out, layout.runs(out), work / "data", stats, filters)
        fl = _write_filters(work / "data", filters, "flags" in pages["columns"])
        meta = {
            "out": str(out),
            "rows": pages["rows"],
            "page_rows": PAGE_ROWS,
            "pages": pages["pages"],
            "index_rows": INDEX_ROWS,
            "columns": pages["columns"],
            "kinds": pages["kinds"],
            "runs": pages["runs"],
            "filters": fl,
        }
        (work / "data" / "meta.js").write_text(_js("flamingoMeta", meta), encoding="utf-8")
        (work / "sources.txt").write_text("".join(p + "\n" for p in sorted(pages["sources"])), encoding="utf-8")
        html = render_index(doc, meta, plots(doc, stats))
        (work / "index.html").write_text(html, encoding="utf-8")
        (work / MARKER).write_text("a flamingo browse report; `flamingo browse` replaces this folder\n")
        if folder.exists():
            shutil.rmtree(folder)
        work.rename(folder)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputError(f"{folder}: cannot write the report: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return BrowseReport(str(out), folder, pages["rows"], pages["pages"], len(fl), size)
