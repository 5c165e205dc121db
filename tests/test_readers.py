"""Every common reader gets the same current rows and columns out of one flamingo output.

The output is made the hard way: manifest passthrough columns of mixed presence and types, one row
per part (so each part would have typed its columns alone before), an engine failure then a
``--retry-failed`` retry, and a changed file captioned again. Then pandas, pyarrow, polars, DuckDB and
HF ``datasets`` read (a) the raw output with the documented reading rule (docs/cron.md) and (b) what
``flamingo export`` writes, and all must agree with ``output.layout.current_rows``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import test_reliability as rel
from conftest import make_audio, run_cli

from flamingo_cli.output.layout import current_rows

COMPARED = ["run", "id", "chunk_index", "caption", "error", "source_version", "year", "genre", "score", "tags", "live"]


def _norm(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _rows(records: list[dict[str, Any]]) -> list[tuple]:
    return sorted(tuple(_norm(r.get(c)) for c in COMPARED) for r in records)


@pytest.fixture
def output(fake: rel.FakeEngine, tmp_path: Path) -> Path:
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(5):
        make_audio(audio / f"f{i}.wav", 1.0, seed=i)
    manifest = audio / "list.jsonl"
    rows = [
        {"path": "f0.wav", "year": 1999, "genre": "rock", "score": 1},
        {"path": "f1.wav", "year": "unknown", "score": 2.5},  # year: int then str -> string column
        {"path": "f2.wav", "tags": ["a", "b"], "genre": None},
        {"path": "f3.wav", "live": True},
        {"path": "f4.wav"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--rows-per-part", "1"]
    fake.fail_ids = {"f1.wav"}
    assert rel.caption([manifest], out, *args).status == 1
    fake.fail_ids = set()
    assert rel.caption([manifest], out, *args, "--retry-failed").status == 0
    make_audio(audio / "f2.wav", 1.5, seed=9)  # the file changed: captioned again, version 1
    assert rel.caption([manifest], out, *args).status == 0
    return out


def test_every_reader_gets_the_same_current_rows(output: Path, tmp_path: Path) -> None:
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    out = output
    # One schema per run: every part has the same columns and types.
    parts = sorted(out.glob("run=*/part-*.parquet"))
    assert len(parts) == 5 + 1 + 1
    schemas = {pq.read_schema(p).remove_metadata() for p in parts}
    assert len(schemas) == 1
    (schema,) = schemas
    assert {n: str(schema.field(n).type) for n in ["year", "genre", "score", "tags", "live"]} == {
        "year": "string",
        "genre": "string",
        "score": "double",
        "tags": "string",
        "live": "bool",
    }

    expected = current_rows(ds.dataset(out, partitioning="hive", format="parquet").to_table()).to_pylist()
    want = _rows(expected)
    assert len(want) == 5
    by_id = {r["id"]: r for r in expected}
    assert by_id["f1.wav"]["error"] is None and by_id["f2.wav"]["source_version"] == 1
    assert by_id["f0.wav"]["year"] == "1999" and by_id["f1.wav"]["year"] == "unknown"
    assert json.loads(by_id["f2.wav"]["tags"]) == ["a", "b"]

    # (a) the raw output with the documented reading rule, reader by reader.
    glob = f"{out}/**/*.parquet"
    df = pd.read_parquet(out)
    df["run"] = df["run"].astype(str)
    df["_v"] = df["source_version"].fillna(0)
    df = df[df["_v"] == df.groupby(["run", "id"])["_v"].transform("max")]
    df = df.sort_values("created_at").drop_duplicates(["run", "id", "chunk_index"], keep="last")
    assert _rows(df.astype(object).where(df.notna(), None).to_dict("records")) == want

    v = pl.col("source_version").fill_null(0)
    cur = (
        pl.scan_parquet(glob, hive_partitioning=True)
        .filter(v == v.max().over("run", "id"))
        .filter(pl.col("created_at") == pl.col("created_at").max().over("run", "id", "chunk_index"))
        .collect()
    )
    assert _rows(cur.to_dicts()) == want

    sql = f"""
        SELECT * FROM read_parquet('{glob}', hive_partitioning = true)
        QUALIFY coalesce(source_version, 0) = max(coalesce(source_version, 0)) OVER (PARTITION BY run, id)
            AND row_number() OVER (PARTITION BY run, id, chunk_index ORDER BY created_at DESC) = 1
    """
    assert _rows(duckdb.sql(sql).arrow().read_all().to_pylist()) == want

    raw = datasets.load_dataset("parquet", data_files=glob, split="train")  # no hive: no `run` column
    assert raw.num_rows == len(parts) and "run" not in raw.column_names
    table = raw.data.table.append_column("run", pa.array([parts[0].parent.name[4:]] * raw.num_rows))
    assert _rows(current_rows(table).to_pylist()) == want

    # (b) flamingo export: the current rows with a real run column, for every reader as is.
    exported = tmp_path / "current.parquet"
    res = run_cli(["export", str(out), "--to", str(exported)])
    assert res.status == 0, res.stderr
    assert _rows(pq.read_table(exported).to_pylist()) == want
    assert _rows(pd.read_parquet(exported).astype(object).to_dict("records")) == want
    assert _rows(pl.read_parquet(exported).to_dicts()) == want
    assert _rows(duckdb.sql(f"SELECT * FROM '{exported}'").arrow().read_all().to_pylist()) == want
    hf = datasets.load_dataset("parquet", data_files=str(exported), split="train")
    assert _rows(hf.to_list()) == want
    names = pq.read_schema(exported).names
    assert names[-1] == "run" and set(hf.column_names) == set(names) == set(pl.read_parquet(exported).columns)

    assert run_cli(["export", str(out), "--to", str(tmp_path / "hf"), "--format", "hf"]).status == 0
    assert _rows(datasets.load_from_disk(str(tmp_path / "hf")).to_list()) == want
    assert run_cli(["export", str(out), "--to", str(tmp_path / "cur.jsonl"), "--format", "jsonl"]).status == 0
    lines = [json.loads(line) for line in (tmp_path / "cur.jsonl").read_text().splitlines()]
    assert _rows(lines) == want


def test_export_usage_errors(tmp_path: Path) -> None:
    res = run_cli(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x.parquet")])
    assert res.status == 2 and "not a flamingo output" in res.stderr
    res = run_cli(["export", str(tmp_path), "--to", str(tmp_path / "x"), "--format", "csv"])
    assert res.status == 2 and "--format 'csv'" in res.stderr
