"""``flamingo inspect OUT``: what a result dataset holds, without loading a model.

Reads ``OUT`` (a folder or an ``s3://`` URL) run by run through the output layout's functions (committed
parts only, each run with its one schema, ``run`` as a column), applies the layout's
reading rule (``output.layout.current_rows``: the latest source version and the latest row per chunk, so a
retried error does not count twice) and summarises: rows, items, chunks, errors grouped by reason (the
file path taken out, numbers and quoted names folded, so "x.wav: empty file" and "y.wav: empty file"
are one group), audio hours, tokens, the runs with their settings (from each part's key-value
metadata, ``output.layout.read_metadata``) and a few sample captions. Captions are read only for the samples.

Schema runs (``--schema``, flamingo_cli/schema.py) also get, per field, how many successful rows fill
it and its most common values, from the typed ``f_*`` columns (or, for a nested schema, from the
top-level keys of ``caption_json``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from flamingo_cli.errors import UsageError

# Columns read for the statistics (captions are not among them).
_STAT_COLUMNS = [
    "run",
    "id",
    "path",
    "chunk_index",
    "num_chunks",
    "start_s",
    "end_s",
    "duration_s",
    "prompt_tokens",
    "output_tokens",
    "error",
    "created_at",
    "source_version",
    "gate",  # gates: silence / duplicate rows (no engine request)
    "flags",  # confidence (issue 25b)
    "attempts",
]
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"(?<![A-Za-z])\d+(?:\.\d+)?")
_ABS_PATH = re.compile(r"(?:(?<=\s)|^)/[^\s;,()]+")


class InspectError(UsageError):
    """OUT is not a flamingo result dataset (or cannot be read); the message says why."""


def error_group(error: str, path: str | None) -> str:
    """The reason of an error without what varies per file: its path, quoted names, numbers."""
    text = error.strip()
    if path:
        if text.startswith(path + ": "):
            text = text[len(path) + 2 :]
        text = text.replace(path, "<path>")
    text = _ABS_PATH.sub("<path>", text)
    text = _QUOTED.sub("'…'", text)
    text = _NUMBER.sub("N", text)
    return text


def _runs(out: str | Path) -> list[tuple[str, list[str]]]:
    """(run key, its complete parts in sequence order): the layout as output/layout.py defines it."""
    from flamingo_cli.output import layout

    return [(key, layout.part_files(out, key)) for key in layout.runs(out)]


def _run_info(out: str | Path, key: str, parts: list[str]) -> dict[str, Any]:
    from flamingo_cli.output.layout import SCHEMA, read_metadata, run_dataset

    info: dict[str, Any] = {"run": key, "parts": len(parts)}
    if not parts:
        return info
    meta: dict[str, Any] = {}
    try:
        meta = read_metadata(parts[-1])  # the latest part: engine versions are added after the first
    except Exception as exc:  # a part written by something else, or without flamingo metadata
        info["metadata_error"] = f"{type(exc).__name__}: {exc}"
    identity = meta.get("identity") or {}
    info.update(
        {
            "model": meta.get("model"),
            "task": meta.get("task"),
            "family": meta.get("family"),
            "prompt": identity.get("prompt"),
            "chunk_seconds": identity.get("chunk_seconds"),
            "overlap": identity.get("overlap"),
            "sampling": meta.get("sampling_effective") or identity.get("sampling"),
            "flamingo_version": meta.get("flamingo_version"),
            "versions": meta.get("versions"),
            "argv": meta.get("argv"),
        }
    )
    if meta.get("schema"):
        schema = meta["schema"]
        info["schema"] = {k: schema.get(k) for k in ("hash", "source", "fields")}
    try:
        dataset = run_dataset(out, key)
        names = dataset.schema.names if dataset is not None else []
        info["extra_columns"] = [n for n in names if n not in SCHEMA.names]
    except Exception:
        info["extra_columns"] = []
    return info


def _sum(values: Any) -> float:
    import pyarrow.compute as pc

    return pc.sum(values).as_py() or 0


def _count(mask: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(pc.cast(mask, "int64")).as_py() or 0)


def schema_fields(out: str | Path, key: str, fields: dict[str, str], top: int = 5) -> dict[str, Any]:
    """Per field of a schema run: rows that fill it (non-null, non-empty) and its most common values.

    Only current successful rows count (error rows have no fields). ``fields`` maps the typed columns
    to their kinds; without any (a nested schema) the top-level keys of ``caption_json`` are used.
    """
    import json

    import pyarrow.compute as pc

    from flamingo_cli.output.layout import current_rows, run_dataset

    keys = ["id", "chunk_index", "created_at", "source_version", "error"]
    try:
        dataset = run_dataset(out, key)
        if dataset is None:
            return {}
        wanted = list(fields) or ["caption_json"]
        table = dataset.to_table(columns=[*keys, *(c for c in wanted if c in dataset.schema.names)])
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    table = current_rows(table) if table.num_rows else table
    ok = table.filter(pc.is_null(table["error"]))
    n = ok.num_rows
    out: dict[str, Any] = {}
    if fields:
        for column, kind in fields.items():
            if column not in ok.column_names:
                continue
            col = ok[column]
            values = pc.list_flatten(col) if kind == "list<string>" else col
            if kind in ("list<string>", "string"):
                empty = pc.equal(pc.list_value_length(col), 0) if kind == "list<string>" else pc.equal(col, "")
                filled = n - col.null_count - _count(pc.fill_null(empty, False))
            else:
                filled = n - col.null_count
            doc: dict[str, Any] = {"kind": kind, "filled": filled, "fill_rate": filled / n if n else None}
            if kind in ("int64", "float64") and filled:
                mm = pc.min_max(col).as_py()
                doc.update({"min": mm["min"], "max": mm["max"], "mean": pc.mean(col).as_py()})
            doc["top"] = _top(values.drop_null().to_pylist(), top)
            out[column] = doc
        return out
    per_key: dict[str, list[Any]] = {}
    for text in ok["caption_json"].drop_null().to_pylist() if "caption_json" in ok.column_names else []:
        value = json.loads(text)
        for k, v in value.items() if isinstance(value, dict) else ():
            per_key.setdefault(k, [])
            if v not in (None, "", [], {}):
                per_key[k].append(v)
    for k, vs in per_key.items():
        scalars = [x for v in vs for x in (v if isinstance(v, list) else [v]) if isinstance(x, str | int | float)]
        out[k] = {"kind": "json", "filled": len(vs), "fill_rate": len(vs) / n if n else None, "top": _top(scalars, top)}
    return out


def _gate_counts(current: Any) -> dict[str, tuple[int, int]]:
    """Per run: current rows gated as silence and as duplicates (written without an engine request)."""
    import pyarrow.compute as pc

    counts: dict[str, list[int]] = {}
    gated = current.filter(pc.is_valid(current["gate"])) if current.num_rows else current
    for run, gate in zip(gated["run"].to_pylist(), gated["gate"].to_pylist(), strict=True):
        c = counts.setdefault(run, [0, 0])
        c[gate != "silence"] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def flag_rates(ok: Any) -> dict[str, Any]:
    """Flags of successful current rows (issue 25b): rows judged (flags not null: older runs have none),
    rows flagged, and per reason its count and its share of the judged rows; rows asked again."""
    import pyarrow.compute as pc

    from flamingo_cli.quality import FLAGS

    flags = ok["flags"] if "flags" in ok.column_names else None
    judged = ok.filter(pc.is_valid(flags)) if flags is not None and ok.num_rows else ok.slice(0, 0)
    n = judged.num_rows
    counts: Counter[str] = Counter()
    flagged = 0
    if n:
        counts.update(pc.list_flatten(judged["flags"]).to_pylist())
        flagged = _count(pc.greater(pc.list_value_length(judged["flags"]), 0))
    names = [*FLAGS, *sorted(set(counts) - set(FLAGS))]
    attempts = ok["attempts"] if "attempts" in ok.column_names and ok.num_rows else None
    return {
        "rows_judged": n,
        "rows_flagged": flagged,
        "flagged_rate": flagged / n if n else None,
        "by_reason": {k: {"rows": counts[k], "rate": counts[k] / n if n else None} for k in names},
        "rows_asked_again": _count(pc.fill_null(pc.greater(attempts, 1), False)) if attempts is not None else 0,
    }


def _top(values: list[Any], n: int) -> list[list[Any]]:
    return [[v, c] for v, c in Counter(values).most_common(n)]


def inspect_output(out: str | Path, samples: int = 3, max_groups: int = 20, top: int = 5) -> dict[str, Any]:
    """The summary of a result dataset as a JSON-ready dict."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flamingo_cli.errors import OutputError
    from flamingo_cli.output import layout
    from flamingo_cli.output.folder import local_path

    if local_path(out) is not None:
        out = Path(out)
        if not out.exists():
            raise InspectError(f"{out}: no such directory")
        if not out.is_dir():
            raise InspectError(f"{out}: not a directory (inspect takes the --out folder of a caption run)")
    try:
        runs = _runs(out)
        if not runs:
            raise InspectError(f"{out}: no run=<key> folders: not a flamingo output (or nothing written yet)")
        tables = [layout.read_run(out, key, columns=_STAT_COLUMNS) for key, _ in runs]
        table = pa.concat_tables(tables, promote_options="permissive")
    except (OSError, pa.ArrowException, OutputError) as exc:
        raise InspectError(f"{out}: cannot read the dataset: {exc}") from exc
    rows_total = table.num_rows
    try:
        from flamingo_cli.output.layout import current_rows
    except ImportError:  # an older layout: every row is current
        current = table
    else:
        current = current_rows(table) if rows_total else table

    err_mask = pc.is_valid(current["error"])
    # Track rows (issue 26, chunk_index -1) cover audio their chunks already count: not chunks.
    is_track = pc.fill_null(pc.equal(current["chunk_index"], -1), False)
    ok = current.filter(pc.and_(pc.invert(err_mask), pc.invert(is_track)))
    errors = current.filter(err_mask)
    items = current.group_by(["run", "id"]).aggregate([("error", "count"), ("duration_s", "max")])
    items_with_errors = _count(pc.greater(items["error_count"], 0)) if items.num_rows else 0
    item_audio_s = _sum(items["duration_s_max"]) if items.num_rows else 0.0
    spoken = ok.filter(pc.invert(pc.fill_null(pc.equal(ok["gate"], "silence"), False)))  # silent rows: no caption
    captioned_s = _sum(pc.subtract(spoken["end_s"], spoken["start_s"])) if spoken.num_rows else 0.0
    gated = _gate_counts(current)

    groups: Counter[str] = Counter()
    example: dict[str, str] = {}
    for error, path in zip(errors["error"].to_pylist(), errors["path"].to_pylist(), strict=True):
        key = error_group(error, path)
        groups[key] += 1
        example.setdefault(key, error)
    by_reason = [{"reason": k, "count": n, "example": example[k]} for k, n in groups.most_common(max_groups)]
    if len(groups) > max_groups:
        rest = sum(n for _, n in groups.most_common()[max_groups:])
        by_reason.append({"reason": f"({len(groups) - max_groups} other reasons)", "count": rest, "example": ""})

    per_run_rows: dict[str, int] = {}
    per_run_items: dict[str, int] = {}
    created: dict[str, tuple[Any, Any]] = {}
    if current.num_rows:
        g = current.group_by("run").aggregate([([], "count_all"), ("created_at", "min"), ("created_at", "max")])
        for run, n, lo, hi in zip(
            g["run"].to_pylist(),
            g["count_all"].to_pylist(),
            g["created_at_min"].to_pylist(),
            g["created_at_max"].to_pylist(),
            strict=True,
        ):
            per_run_rows[run] = n
            created[run] = (lo, hi)
        g = items.group_by("run").aggregate([([], "count_all")])
        per_run_items = dict(zip(g["run"].to_pylist(), g["count_all"].to_pylist(), strict=True))
    from flamingo_cli.output.layout import read_scan

    run_docs = []
    for key, parts in runs:
        info = _run_info(out, key, parts)
        scan = read_scan(out, key)
        if scan is not None:  # what the latest complete folder scan passed over
            info["passed_over"] = {str(k): int(v) for k, v in (scan.get("skipped") or {}).items()}
            info["passed_over_complete"] = bool(scan.get("complete"))
        info["rows"] = per_run_rows.get(key, 0)
        info["items"] = per_run_items.get(key, 0)
        info["chunks_silent"], info["chunks_duplicate"] = gated.get(key, (0, 0))
        lo, hi = created.get(key, (None, None))
        info["first_row_at"] = lo.isoformat() if lo else None
        info["last_row_at"] = hi.isoformat() if hi else None
        if info.get("schema") and parts:
            info["fields"] = schema_fields(out, key, info["schema"].get("fields") or {}, top)
        info["flags"] = flag_rates(ok.filter(pc.equal(ok["run"], key)) if ok.num_rows else ok)
        run_docs.append(info)

    sample_rows: list[dict[str, Any]] = []
    if samples > 0 and ok.num_rows:
        import pyarrow.dataset as ds

        for key, _ in runs:  # captions are read for the samples only
            dataset = layout.run_dataset(out, key)
            if dataset is None or len(sample_rows) >= samples:
                continue
            head = dataset.head(
                samples - len(sample_rows),
                columns=["id", "chunk_index", "num_chunks", "start_s", "end_s", "caption"],
                filter=ds.field("error").is_null() & ds.field("caption").is_valid(),
            )
            sample_rows += [{"run": key, **row} for row in head.to_pylist()]

    def total(col: str) -> int:
        return int(_sum(current[col])) if current.num_rows else 0

    n_items = items.num_rows
    return {
        "out": str(out),
        "rows": rows_total,
        "rows_current": current.num_rows,
        "rows_superseded": rows_total - current.num_rows,
        "runs": len(runs),
        "items": n_items,
        "items_ok": n_items - items_with_errors,
        "items_with_errors": items_with_errors,
        "chunks_ok": ok.num_rows,
        "chunks_silent": sum(n for n, _ in gated.values()),
        "chunks_duplicate": sum(n for _, n in gated.values()),
        "track_rows": _count(is_track) if current.num_rows else 0,
        "chunk_errors": _count(pc.greater(errors["num_chunks"], 0)) if errors.num_rows else 0,
        "item_errors": _count(pc.equal(errors["num_chunks"], 0)) if errors.num_rows else 0,
        "errors_by_reason": by_reason,
        "audio_hours_captioned": captioned_s / 3600,
        "audio_hours_items": item_audio_s / 3600,
        "prompt_tokens": total("prompt_tokens"),
        "output_tokens": total("output_tokens"),
        "flags": flag_rates(ok),
        "run_details": run_docs,
        "samples": sample_rows,
    }


def _span(first: str | None, last: str | None) -> str:
    """ "2026-11-27 02:00 → 03:15" (the date again only when it changed); times are UTC."""
    if not first or not last:
        return ""
    a, b = first[:16].replace("T", " "), last[:16].replace("T", " ")
    return f"{a} → {b[11:] if a[:10] == b[:10] else b} UTC"


def render(doc: dict[str, Any], console: Any) -> None:
    """Print the summary as Rich tables."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"flamingo inspect {doc['out']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    superseded = f"{doc['rows_superseded']:,} superseded (retried or re-captioned)" if doc["rows_superseded"] else ""
    t.add_row("rows", f"{doc['rows']:,}", superseded)
    t.add_row("runs", str(doc["runs"]), "")
    t.add_row("items", f"{doc['items']:,}", f"{doc['items_ok']:,} ok, {doc['items_with_errors']:,} with errors")
    t.add_row("chunks captioned", f"{doc['chunks_ok']:,}", "")
    t.add_row(
        "errors",
        f"{doc['chunk_errors'] + doc['item_errors']:,}",
        f"{doc['item_errors']:,} items unreadable, {doc['chunk_errors']:,} chunks failed",
    )
    items_h = f"items total {doc['audio_hours_items']:,.3f} h"
    t.add_row("audio captioned", f"{doc['audio_hours_captioned']:,.3f} h", items_h)
    t.add_row("tokens", f"{doc['prompt_tokens']:,} in", f"{doc['output_tokens']:,} generated")
    console.print(t)

    if doc["errors_by_reason"]:
        e = Table("count", "reason", "example", title="errors by reason", title_justify="left")
        for g in doc["errors_by_reason"]:
            e.add_row(f"{g['count']:,}", g["reason"], Text(g["example"], style="dim"))
        console.print(e)

    r = Table("run", "model", "task", title="runs", title_justify="left")
    for name in ("rows", "items", "parts", "silent", "duplicate"):
        r.add_column(name, justify="right")
    r.add_column("written")
    for run in doc["run_details"]:
        span = _span(run.get("first_row_at"), run.get("last_row_at"))
        r.add_row(
            run["run"],
            str(run.get("model")),
            str(run.get("task")),
            f"{run.get('rows', 0):,}",
            f"{run.get('items', 0):,}",
            str(run.get("parts", 0)),
            f"{run.get('chunks_silent', 0):,}",
            f"{run.get('chunks_duplicate', 0):,}",
            span,
        )
    console.print(r)
    from flamingo_cli.sources import describe_skipped

    for run in doc["run_details"]:
        passed_over = describe_skipped(run.get("passed_over") or {})
        if passed_over:
            partial = "" if run.get("passed_over_complete") else " (scan interrupted: at least)"
            note = f"run {run['run']}: last scan {passed_over}{partial}; --ext all takes every file"
            console.print(Text(note, style="yellow"), soft_wrap=True)
    for run in doc["run_details"]:
        if run.get("prompt"):
            sampling = run.get("sampling") or {}
            settings = ", ".join(f"{k}={v}" for k, v in sampling.items() if v is not None)
            console.print(Text(f"run {run['run']}: prompt {run['prompt']!r}; {settings}", style="dim"), soft_wrap=True)
    for run in doc["run_details"]:
        fields = run.get("fields")
        if not fields or "error" in fields:
            continue
        schema = run.get("schema") or {}
        f = Table("field", "filled", "values", title=f"run {run['run']}: schema {schema.get('hash')} fields")
        f.title_justify = "left"
        for name, d in fields.items():
            rate = f"{d['filled']:,} ({d['fill_rate']:.0%})" if d.get("fill_rate") is not None else "0"
            top = ", ".join(f"{v} ×{c}" for v, c in d.get("top", []))
            if "min" in d:
                top = f"min {d['min']}, mean {d['mean']:.4g}, max {d['max']}; " + top
            f.add_row(name, rate, Text(top))
        console.print(f)

    _render_flags(doc, console)

    if doc["samples"]:
        s = Table("id", "chunk", "caption", title="sample captions", title_justify="left", show_lines=True)
        for row in doc["samples"]:
            # a track row (chunk_index -1) tells the whole file its chunks cover
            where = "track" if row["chunk_index"] == -1 else f"{row['chunk_index'] + 1}/{row['num_chunks']}"
            if row.get("start_s") is not None:
                where += f" ({row['start_s']:.0f}–{row['end_s']:.0f} s)"
            s.add_row(str(row["id"]), where, Text(str(row["caption"])))
        console.print(s)
    console.print(
        Text(f"browse every row, with players and plots: flamingo browse {doc['out']}", style="dim"), soft_wrap=True
    )


def _render_flags(doc: dict[str, Any], console: Any) -> None:
    """Flag rates per reason per run (issue 25b), for runs whose rows carry flags."""
    from rich.table import Table

    runs = [r for r in doc["run_details"] if (r.get("flags") or {}).get("rows_judged")]
    if not runs:
        return
    t = Table("run", "reason", "rows", "rate", title="flags (successful rows)", title_justify="left")
    for run in runs:
        f = run["flags"]
        t.add_row(run["run"], "any", f"{f['rows_flagged']:,} of {f['rows_judged']:,}", f"{f['flagged_rate']:.1%}")
        for reason, c in f["by_reason"].items():
            if c["rows"]:
                t.add_row("", reason, f"{c['rows']:,}", f"{c['rate']:.1%}")
        if f.get("rows_asked_again"):
            t.add_row("", "asked again (--fallback)", f"{f['rows_asked_again']:,}", "")
    console.print(t)
