"""Export: OUT's current rows written to one file (Parquet, JSONL) or an HF ``datasets`` folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_cli.errors import OutputError
from flamingo_cli.output import objstore
from flamingo_cli.output.columns import json_default
from flamingo_cli.output.folder import describe_oserror, local_path, write_atomically
from flamingo_cli.output.layout import read_output

EXPORT_FORMATS = ("parquet", "jsonl", "hf")


def export(
    out: str | Path, dest: str | Path, fmt: str = "parquet", run: str | None = None, drop_flagged: bool = False
) -> int:
    """Write OUT's current rows (``read_output``) to ``dest``; returns the row count.

    ``drop_flagged``: leave out the rows with flags (a non-empty ``flags`` list, issue 25b); error rows
    and rows of runs without flags stay.

    parquet: one file; jsonl: one file, one object per row; hf: a ``datasets.load_from_disk`` folder.
    Local destinations appear whole or not at all (temp + rename); on object stores one PUT is atomic.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    table = read_output(out, run=run)
    if drop_flagged:
        table = without_flagged(table)
    dest_s = str(dest)
    if fmt == "hf":
        return _export_hf(table, dest_s)
    buf = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(table, buf, compression="zstd")
    else:
        lines = (json.dumps(r, ensure_ascii=False, default=json_default) + "\n" for r in table.to_pylist())
        buf.write("".join(lines).encode("utf-8"))
    data = buf.getvalue().to_pybytes()
    target = local_path(dest_s)
    if target is None:
        try:
            store, path = objstore.open_store(dest_s)
            store.put(path, data)
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        return table.num_rows

    def write(tmp: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)

    write_atomically(target, target.with_name(f".{target.name}.{os.getpid()}.tmp"), write)
    return table.num_rows


def without_flagged(table: pa.Table) -> pa.Table:
    """The rows whose ``flags`` list is null or empty."""
    import pyarrow.compute as pc

    if "flags" not in table.column_names or table.num_rows == 0:
        return table
    flagged = pc.fill_null(pc.greater(pc.list_value_length(table["flags"]), 0), False)
    return table.filter(pc.invert(flagged))


def _export_hf(table: pa.Table, dest: str) -> int:
    try:
        import datasets
    except ImportError as exc:
        raise OutputError(f"{dest}: --format hf needs the datasets package: pip install datasets") from exc
    dataset = datasets.Dataset(table)
    target = local_path(dest)
    if target is None:
        dataset.save_to_disk(dest)
        return table.num_rows
    if target.exists():
        raise OutputError(f"{target}: already exists (export writes a new folder; remove it first)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        dataset.save_to_disk(str(tmp))
        os.replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(describe_oserror(target, "write", exc)) from exc
    return table.num_rows
