"""Tests for flamingo_cli.sink and the output layout it writes: schema, atomic parts, batching, resume index,
dedup, errors."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import flamingo_cli
from flamingo_cli.errors import OutputError
from flamingo_cli.output import layout
from flamingo_cli.output import writers as writers_mod
from flamingo_cli.output.layout import METADATA_KEY, SCHEMA, read_metadata, run_key
from flamingo_cli.records import AudioItem, Chunk, Result, error_result
from flamingo_cli.resume import ResumeIndex
from flamingo_cli.sink import Sink

KEY = "abc123def456"
RUN_INFO = {"vllm": "0.24.0", "transformers": "5.5.3", "torch": "2.11.0", "config_hash": "deadbeef"}


def make_result(
    item_id: str = "a",
    index: int = 0,
    num_chunks: int = 1,
    *,
    extra: dict[str, Any] | None = None,
    caption: str | None = "a caption",
    error: str | None = None,
) -> Result:
    item = AudioItem(id=item_id, path=f"/audio/{item_id}.wav", extra=extra or {})
    chunk = Chunk(
        item=item,
        index=index,
        num_chunks=num_chunks,
        start_s=30.0 * index,
        end_s=30.0 * (index + 1),
        samples=None,
        duration_s=30.0 * num_chunks,
    )
    return Result(
        chunk=chunk,
        prompt="Describe the audio.",
        caption=None if error else caption,
        finish_reason=None if error else "stop",
        prompt_tokens=None if error else 120,
        output_tokens=None if error else 15,
        error=error,
    )


def make_sink(out: Path, **kw: Any) -> Sink:
    kw.setdefault("rows_per_part", 1000)
    return Sink(out, KEY, RUN_INFO, model="nvidia/audio-flamingo-3-hf", task="caption", **kw)


def parts(out: Path, key: str = KEY) -> list[Path]:
    return sorted((out / f"run={key}").glob("part-*.parquet"))


def read_run(out: Path) -> pa.Table:
    return ds.dataset(out, format="parquet", partitioning="hive").to_table()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- schema and layout -----------------------------------------------------------------------------


def test_schema_column_order_and_types(tmp_path: Path) -> None:
    assert SCHEMA.names == [
        "id",
        "path",
        "chunk_index",
        "num_chunks",
        "start_s",
        "end_s",
        "duration_s",
        "model",
        "task",
        "prompt",
        "caption",
        "reasoning",
        "finish_reason",
        "prompt_tokens",
        "output_tokens",
        "error",
        "created_at",
        "source_size",
        "source_mtime_ns",
        "source_sha256",
        "source_version",
        "warnings",
        "path_bytes",
        # gates (issue 25a)
        "rms_dbfs",
        "peak_dbfs",
        "active_ratio",
        "speech_ratio",
        "speech_segments",
        "audio_sha256",
        "gate",
        "duplicate_of",
        "duplicate_of_chunk",
        # segments and tracks (issue 26)
        "level",
        "segments",
        # confidence (issue 25b)
        "avg_logprob",
        "compression_ratio",
        "flags",
        "attempts",
    ]
    assert SCHEMA.field("path_bytes").type == pa.binary()
    segment = pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())])
    assert SCHEMA.field("segments").type == pa.list_(segment)
    assert SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert SCHEMA.field("reasoning").type == pa.string() and SCHEMA.field("reasoning").nullable
    assert SCHEMA.field("chunk_index").type == pa.int32()

    with make_sink(tmp_path) as s:
        s.write(make_result("a", extra={"genre": "jazz"}))
    (part,) = parts(tmp_path)
    assert part.parent.name == f"run={KEY}"
    table = pq.read_table(part)
    assert table.schema.names == [*SCHEMA.names, "genre"]
    for f in SCHEMA:
        assert table.schema.field(f.name).type == f.type
    row = table.to_pylist()[0]
    assert row["id"] == "a"
    assert row["path"] == "/audio/a.wav"
    assert (row["chunk_index"], row["num_chunks"]) == (0, 1)
    assert (row["start_s"], row["end_s"], row["duration_s"]) == (0.0, 30.0, 30.0)
    assert row["model"] == "nvidia/audio-flamingo-3-hf"
    assert row["task"] == "caption"
    assert row["prompt"] == "Describe the audio."
    assert row["caption"] == "a caption"
    assert row["finish_reason"] == "stop"
    assert (row["prompt_tokens"], row["output_tokens"]) == (120, 15)
    assert row["error"] is None
    assert row["created_at"].tzinfo is not None
    assert row["genre"] == "jazz"
    assert (row["level"], row["segments"]) == ("chunk", [])


def test_part_name_format(tmp_path: Path) -> None:
    with make_sink(tmp_path, rows_per_part=1) as s:
        s.write(make_result("a"))
        s.write(make_result("b"))
    names = [p.name for p in parts(tmp_path)]
    assert len(names) == 2
    for seq, name in enumerate(names):
        assert name.startswith(f"part-{seq:06d}-")
        assert len(name) == len("part-000000-12345678.parquet")


def test_hive_dataset_exposes_run_column(tmp_path: Path) -> None:
    other = run_key({"model": "other"})
    with make_sink(tmp_path) as s:
        s.write(make_result("a"))
    with Sink(tmp_path, other, {}, model="m", task="t") as s2:
        s2.write(make_result("b"))
    table = read_run(tmp_path)
    assert table.schema.field("run").type == pa.string()
    assert sorted(zip(table["run"].to_pylist(), table["id"].to_pylist(), strict=True)) == sorted(
        [(KEY, "a"), (other, "b")]
    )


def test_metadata_on_every_part(tmp_path: Path) -> None:
    with make_sink(tmp_path, rows_per_part=1) as s:
        s.write(make_result("a"))
        s.write(make_result("b"))
    assert len(parts(tmp_path)) == 2
    for part in parts(tmp_path):
        meta = read_metadata(part)
        assert meta["flamingo_version"] == flamingo_cli.__version__
        assert meta["run_key"] == KEY
        for k, v in RUN_INFO.items():
            assert meta[k] == v
        raw = pq.read_schema(part).metadata[METADATA_KEY]
        assert json.loads(raw) == meta


# --- run_key -------------------------------------------------------------------------------------


def test_run_key_stable_and_order_insensitive() -> None:
    a = {"model": "m", "task": "caption", "sampling": {"temperature": 0.0, "max_tokens": 512}}
    b = {"sampling": {"max_tokens": 512, "temperature": 0.0}, "task": "caption", "model": "m"}
    assert run_key(a) == run_key(b)
    assert run_key(a) == run_key(dict(a))
    assert len(run_key(a)) == 12
    int(run_key(a), 16)  # hex
    assert run_key(a) != run_key({**a, "task": "lyrics"})
    # Never purely numeric: hive readers would otherwise type the run column as a number.
    for i in range(200):
        assert run_key({"i": i})[0] in "abcdef"


def test_run_key_known_value() -> None:
    # Pin the value: a change would orphan every existing run directory on resume.
    assert run_key({"model": "m", "task": "caption"}) == "a4d46bc82462"
    assert isinstance(run_key({"x": object()}), str)  # non-JSON values do not crash


def test_bad_run_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Sink(tmp_path, "../evil", {}, model="m", task="t")
    with pytest.raises(ValueError):
        Sink(tmp_path, ".hidden", {}, model="m", task="t")


# --- atomicity -----------------------------------------------------------------------------------


def test_tmp_files_invisible_to_dataset_readers(tmp_path: Path) -> None:
    with make_sink(tmp_path) as s:
        s.write(make_result("a"))
    # A crashed writer's half-written part: a valid-looking parquet file in .tmp.
    tmp_dir = tmp_path / f"run={KEY}" / ".tmp"
    pq.write_table(pa.table({"id": ["ghost"]}), tmp_dir / "part-000001-00000000.parquet.tmp")
    (tmp_dir / "garbage.parquet").write_bytes(b"not parquet")
    assert read_run(tmp_path)["id"].to_pylist() == ["a"]
    assert pq.read_table(tmp_path)["id"].to_pylist() == ["a"]
    assert ds.dataset(tmp_path / f"run={KEY}", format="parquet").to_table()["id"].to_pylist() == ["a"]


def test_leftover_tmp_cleaned_on_open(tmp_path: Path) -> None:
    tmp_dir = tmp_path / f"run={KEY}" / ".tmp"
    tmp_dir.mkdir(parents=True)
    leftover = tmp_dir / "part-000000-aaaaaaaa.parquet.tmp"
    leftover.write_bytes(b"half a part")
    s = make_sink(tmp_path)
    assert not leftover.exists()
    assert list(tmp_dir.iterdir()) == []
    s.close()


def test_no_tmp_left_after_flush(tmp_path: Path) -> None:
    with make_sink(tmp_path, rows_per_part=2) as s:
        for i in range(5):
            s.write(make_result(f"i{i}"))
    assert list((tmp_path / f"run={KEY}" / ".tmp").iterdir()) == []
    assert len(parts(tmp_path)) == 3


def test_lock_prevents_second_writer(tmp_path: Path) -> None:
    s = make_sink(tmp_path)
    with pytest.raises(OutputError, match="another flamingo process"):
        make_sink(tmp_path)
    s.close()
    make_sink(tmp_path).close()  # released on close


# --- batching ------------------------------------------------------------------------------------


def test_rows_per_part(tmp_path: Path) -> None:
    s = make_sink(tmp_path, rows_per_part=3)
    for i in range(7):
        s.write(make_result(f"i{i}"))
    assert s.parts_written == 2
    assert s.rows_written == 6
    assert s.buffered == 1
    assert [pq.read_metadata(p).num_rows for p in parts(tmp_path)] == [3, 3]
    s.close()
    assert s.parts_written == 3
    assert s.rows_written == 7
    assert [pq.read_metadata(p).num_rows for p in parts(tmp_path)] == [3, 3, 1]


def test_flush_seconds(tmp_path: Path) -> None:
    clock = FakeClock()
    s = make_sink(tmp_path, flush_seconds=30.0, clock=clock)
    s.write(make_result("a"))
    clock.now += 10
    s.write(make_result("b"))
    assert s.parts_written == 0
    clock.now += 19.9
    s.flush_if_due()
    assert s.parts_written == 0
    clock.now += 0.2  # 30.1 s after the first buffered row
    s.write(make_result("c"))
    assert s.parts_written == 1
    assert s.rows_written == 3
    # The timer restarts at the next first buffered row.
    clock.now += 100
    s.write(make_result("d"))
    assert s.parts_written == 1
    clock.now += 30
    s.flush_if_due()
    assert s.parts_written == 2
    s.close()
    assert len(read_run(tmp_path)) == 4


def test_flush_empty_is_noop_and_close_idempotent(tmp_path: Path) -> None:
    s = make_sink(tmp_path)
    s.flush()
    s.close()
    s.close()
    assert parts(tmp_path) == []
    assert s.parts_written == 0
    with pytest.raises(RuntimeError):
        s.write(make_result("a"))


def test_context_manager_flushes_on_exception(tmp_path: Path) -> None:
    with pytest.raises(KeyError), make_sink(tmp_path) as s:
        s.write(make_result("a"))
        raise KeyError("pipeline died")
    assert read_run(tmp_path)["id"].to_pylist() == ["a"]


# --- resume index and dedup ----------------------------------------------------------------------


def write_mixed_run(out: Path) -> None:
    with make_sink(out, rows_per_part=2) as s:
        # done: 3 of 3 chunks
        for i in range(3):
            s.write(make_result("done", i, 3))
        # partial: chunks 0 and 2 of 4
        s.write(make_result("partial", 0, 4))
        s.write(make_result("partial", 2, 4))
        # chunk-level failure: chunk 1 of 2 too short
        s.write(make_result("chunkfail", 0, 2))
        s.write(make_result("chunkfail", 1, 2, error="chunk too short"))
        # item-level failure: no chunks could be made
        s.write(error_result(AudioItem(id="broken", path="/audio/broken.wav"), "decode error: bad header"))


def test_resume_index_after_reopen(tmp_path: Path) -> None:
    write_mixed_run(tmp_path)
    s = make_sink(tmp_path)
    idx = s.load_index()
    assert len(idx) == 8
    assert idx.is_done("done")
    assert idx.done_chunks("done") == {0, 1, 2}
    assert not idx.is_done("partial")
    assert idx.done_chunks("partial") == {0, 2}
    assert idx.is_done("chunkfail")
    assert idx.is_done("broken")
    assert idx.done_chunks("broken") == set()
    assert not idx.is_done("never-seen")
    assert idx.done_chunks("never-seen") == set()
    assert idx.failed_items() == {"chunkfail", "broken"}
    assert "partial" in idx
    assert "never-seen" not in idx
    s.close()


def test_empty_index(tmp_path: Path) -> None:
    with make_sink(tmp_path) as s:
        idx = s.load_index()
    assert len(idx) == 0
    assert not idx.is_done("a")
    assert idx.failed_items() == set()
    assert len(ResumeIndex()) == 0


def test_index_ignores_other_runs_and_tmp(tmp_path: Path) -> None:
    with Sink(tmp_path, run_key({"other": 1}), {}, model="m", task="t") as other:
        other.write(make_result("x"))
    s = make_sink(tmp_path)
    s.write(make_result("a"))
    s.flush()
    tmp_dir = tmp_path / f"run={KEY}" / ".tmp"
    # Written after open, so not cleaned: must still not be read.
    pq.write_table(pq.read_table(parts(tmp_path)[0]), tmp_dir / "part-000009-00000000.parquet.tmp")
    idx = s.load_index()
    assert len(idx) == 1
    assert idx.is_done("a")
    assert not idx.is_done("x")
    s.close()


def test_resume_finishes_partial_items_without_duplicates(tmp_path: Path) -> None:
    write_mixed_run(tmp_path)
    s = make_sink(tmp_path)
    idx = s.load_index()
    todo = [i for i in range(4) if i not in idx.done_chunks("partial")]
    assert todo == [1, 3]
    for i in todo:
        s.write(make_result("partial", i, 4))
    s.close()
    s2 = make_sink(tmp_path)
    assert s2.load_index().is_done("partial")
    s2.close()
    table = read_run(tmp_path)
    keys = list(zip(table["id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 10


def test_duplicates_dropped(tmp_path: Path) -> None:
    write_mixed_run(tmp_path)
    s = make_sink(tmp_path, rows_per_part=1)
    s.write(make_result("done", 1, 3))  # on disk
    s.write(make_result("partial", 0, 4))  # on disk
    s.write(make_result("chunkfail", 1, 2))  # on disk as an error: not retried by default
    s.write(make_result("broken", 0, 2))  # item done as a num_chunks=0 row
    s.write(error_result(AudioItem(id="done", path="/audio/done.wav"), "late error"))  # key (done, 0)
    assert s.duplicates_dropped == 5
    s.write(make_result("partial", 1, 4))  # new
    s.write(make_result("new", 0, 1))  # new
    s.write(make_result("new", 0, 1))  # this sink already wrote it (flushed)
    s.write(make_result("new2", 0, 2))
    s.rows_per_part = 10  # keep the next one buffered
    s.write(make_result("new3", 0, 1))
    s.write(make_result("new3", 0, 1))  # duplicate of a buffered row
    s.write(make_result("new2", 0, 2))  # duplicate of a flushed row
    assert s.buffered == 1
    assert s.duplicates_dropped == 8
    s.close()
    assert s.rows_written == 4
    table = read_run(tmp_path)
    keys = list(zip(table["id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 12


def test_retry_failed_rewrites_only_failed_keys(tmp_path: Path) -> None:
    write_mixed_run(tmp_path)
    s = make_sink(tmp_path, retry_failed=True)
    idx = s.load_index()
    assert idx.failed_keys() == {("chunkfail", 1), ("broken", 0)}
    s.write(make_result("chunkfail", 0, 2))  # succeeded before: still a duplicate
    s.write(make_result("chunkfail", 1, 2))  # failed before: retried
    s.write(make_result("chunkfail", 1, 2))  # only once
    for i in range(2):  # the broken item now decodes into 2 chunks
        s.write(make_result("broken", i, 2))
    assert s.duplicates_dropped == 2
    s.close()
    assert s.rows_written == 3
    s2 = make_sink(tmp_path)
    idx2 = s2.load_index()
    assert idx2.failed_items() == set()
    assert idx2.is_done("broken")
    assert idx2.done_chunks("broken") == {0, 1}
    s2.close()


def test_index_fast_for_many_rows(tmp_path: Path) -> None:
    n = 200_000
    table = pa.table(
        {
            "id": pa.array([f"item{i // 2}" for i in range(n)]),
            "chunk_index": pa.array([i % 2 for i in range(n)], pa.int32()),
            "num_chunks": pa.array([2] * n, pa.int32()),
            "error": pa.array([None] * n, pa.string()),
        }
    )
    idx = ResumeIndex(table)
    assert len(idx) == n
    assert idx.is_done("item0")
    assert idx.is_done(f"item{n // 2 - 1}")
    assert idx.failed_items() == set()


# --- error rows ----------------------------------------------------------------------------------


def test_error_result_rows(tmp_path: Path) -> None:
    item = AudioItem(id="broken", path="/audio/broken.wav", prompt="Describe.", extra={"split": "test"})
    r = error_result(item, "file not found")
    assert r.chunk.num_chunks == 0
    assert r.chunk.index == 0
    assert r.error == "file not found"
    assert r.chunk.samples is None
    assert math.isnan(r.chunk.start_s)
    with make_sink(tmp_path) as s:
        s.write(r)
        s.write(make_result("ok", 1, 3, error="engine rejected the request"))
    rows = {row["id"]: row for row in read_run(tmp_path).to_pylist()}
    b = rows["broken"]
    assert (b["chunk_index"], b["num_chunks"]) == (0, 0)
    assert b["start_s"] is None and b["end_s"] is None and b["duration_s"] is None
    assert b["caption"] is None
    assert b["error"] == "file not found"
    assert b["prompt"] == "Describe."
    assert b["split"] == "test"
    c = rows["ok"]
    assert (c["chunk_index"], c["num_chunks"]) == (1, 3)
    assert c["error"] == "engine rejected the request"
    assert c["caption"] is None


def test_chunk_error_used_when_result_has_none(tmp_path: Path) -> None:
    r = make_result("short", 0, 1)
    r.chunk.error = "chunk too short"
    r.caption = None
    with make_sink(tmp_path) as s:
        s.write(r)
    assert read_run(tmp_path)["error"].to_pylist() == ["chunk too short"]


# --- passthrough ---------------------------------------------------------------------------------


def test_passthrough_types_missing_and_mixed(tmp_path: Path) -> None:
    extras = [
        {"genre": "rock", "bpm": 120, "tempo": 1, "live": True, "tags": ["a", "b"], "mixed": 1},
        {"genre": "jazz", "bpm": 90, "tempo": 2.5, "live": False, "tags": {"k": 1}, "mixed": "x"},
        {"bpm": None, "only_here": 3.5, "mixed": True},
        {},
    ]
    with make_sink(tmp_path) as s:
        for i, extra in enumerate(extras):
            s.write(make_result(f"i{i}", extra=extra))
    table = pq.read_table(parts(tmp_path)[0])
    assert table.schema.names[: len(SCHEMA)] == SCHEMA.names
    types = {n: table.schema.field(n).type for n in table.schema.names[len(SCHEMA) :]}
    assert types == {
        "genre": pa.string(),
        "bpm": pa.int64(),
        "tempo": pa.float64(),  # ints mixed with floats promote to float64
        "live": pa.bool_(),
        "tags": pa.string(),  # lists/dicts as JSON
        "mixed": pa.string(),  # any other mix: everything stringified
        "only_here": pa.float64(),
    }
    assert table["genre"].to_pylist() == ["rock", "jazz", None, None]
    assert table["bpm"].to_pylist() == [120, 90, None, None]
    assert table["tempo"].to_pylist() == [1.0, 2.5, None, None]
    assert table["live"].to_pylist() == [True, False, None, None]
    assert [json.loads(v) if v else v for v in table["tags"].to_pylist()] == [
        ["a", "b"],
        {"k": 1},
        None,
        None,
    ]
    assert table["mixed"].to_pylist() == ["1", "x", "true", None]
    assert table["only_here"].to_pylist() == [None, None, 3.5, None]


def test_passthrough_name_clashes(tmp_path: Path) -> None:
    extra = {"id": "manifest-id", "caption": "human caption", "run": 7, "extra_id": "taken", "lang": "en"}
    with make_sink(tmp_path) as s:
        s.write(make_result("a", extra=extra))
    table = pq.read_table(parts(tmp_path)[0])
    names = table.schema.names
    assert names[: len(SCHEMA)] == SCHEMA.names
    row = table.to_pylist()[0]
    assert row["id"] == "a"
    assert row["caption"] == "a caption"
    assert row["extra_caption"] == "human caption"
    assert row["extra_run"] == 7
    assert row["extra_id"] == "taken"
    assert row["extra_extra_id"] == "manifest-id"
    assert row["lang"] == "en"
    # The hive partition column still wins when reading the whole dataset.
    assert read_run(tmp_path)["run"].to_pylist() == [KEY]


def test_passthrough_all_null_column_is_string(tmp_path: Path) -> None:
    with make_sink(tmp_path) as s:
        s.write(make_result("a", extra={"note": None}))
    table = pq.read_table(parts(tmp_path)[0])
    assert table.schema.field("note").type == pa.string()


def test_one_schema_per_run_misfits_are_null_with_a_warning(tmp_path: Path) -> None:
    """The first part fixes the passthrough columns; later parts keep them (names and types)."""
    with make_sink(tmp_path, rows_per_part=1) as s:
        s.write(make_result("a", extra={"bpm": 120}))
        s.write(make_result("b", extra={"bpm": 92.5, "key": "C"}))
        s.write(make_result("c", extra={}))
    schemas = [pq.read_schema(p) for p in parts(tmp_path)]
    assert len(schemas) == 3
    assert all(sch.remove_metadata() == schemas[0].remove_metadata() for sch in schemas)
    assert schemas[0].field("bpm").type == pa.int64()
    rows = {r["id"]: r for r in ds.dataset(tmp_path / f"run={KEY}", format="parquet").to_table().to_pylist()}
    assert rows["a"]["bpm"] == 120 and rows["a"]["warnings"] is None
    assert rows["b"]["bpm"] is None
    assert "bpm: 92.5 is not int64; stored null" in rows["b"]["warnings"]
    assert "key: not a column of this run" in rows["b"]["warnings"]
    assert "key" not in rows["b"]
    assert rows["c"]["bpm"] is None and rows["c"]["warnings"] is None


def test_declared_columns_fix_the_schema_before_the_first_part(tmp_path: Path) -> None:
    columns = {"year": "int64", "genre": "string", "score": "float64", "live": "bool", "id": "string"}
    with make_sink(tmp_path, rows_per_part=1, columns=columns) as s:
        s.write(make_result("a", extra={"year": "1999"}))  # a string where an int is declared
        s.write(make_result("b", extra={"year": 2001, "score": 3, "live": True, "genre": 7, "id": "x"}))
    schemas = [pq.read_schema(p).remove_metadata() for p in parts(tmp_path)]
    assert schemas[0] == schemas[1]
    assert [(f.name, f.type) for f in schemas[0]][len(SCHEMA) :] == [
        ("year", pa.int64()),
        ("genre", pa.string()),
        ("score", pa.float64()),
        ("live", pa.bool_()),
        ("extra_id", pa.string()),
    ]
    rows = {
        r["id"]: r
        for r in pq.read_table(parts(tmp_path)[0]).to_pylist() + pq.read_table(parts(tmp_path)[1]).to_pylist()
    }
    assert rows["a"]["year"] is None and "year: '1999' is not int64" in rows["a"]["warnings"]
    assert (rows["b"]["year"], rows["b"]["score"], rows["b"]["live"], rows["b"]["genre"]) == (2001, 3.0, True, "7")
    assert rows["b"]["extra_id"] == "x" and rows["b"]["warnings"] is None
    # A resume keeps the first part's schema whatever it declares.
    with make_sink(tmp_path, columns={"other": "string"}) as s:
        assert s.columns == {
            "year": "int64",
            "genre": "string",
            "score": "double",
            "live": "bool",
            "extra_id": "string",
        }


def test_declared_column_type_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not one of"):
        make_sink(tmp_path, columns={"year": "integer"})


# --- output errors -------------------------------------------------------------------------------


def _can_write(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def test_unwritable_dir_raises_output_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if _can_write(locked):
            pytest.skip("running as a user that ignores directory permissions (root)")
        with pytest.raises(OutputError) as info:
            make_sink(locked / "out")
        assert str(locked) in str(info.value)
        assert "permission denied" in str(info.value)
    finally:
        locked.chmod(0o700)


def test_unwritable_existing_run_dir_raises_output_error(tmp_path: Path) -> None:
    make_sink(tmp_path).close()
    run_dir = tmp_path / f"run={KEY}"
    run_dir.chmod(0o500)
    try:
        if _can_write(run_dir):
            pytest.skip("running as a user that ignores directory permissions (root)")
        with pytest.raises(OutputError, match="permission denied"):
            make_sink(tmp_path, lock=False)
    finally:
        run_dir.chmod(0o700)


def test_out_dir_is_a_file_raises_output_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(OutputError, match=r"^--out is a file: ") as info:
        make_sink(not_a_dir)
    assert str(not_a_dir) in str(info.value)


def test_failed_probe_raises_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too: simulate a directory that refuses new files (e.g. a read-only mount).
    def refuse(self: Path, data: bytes) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(OutputError, match="read-only file system") as info:
        make_sink(tmp_path)
    assert f"run={KEY}" in str(info.value)
    monkeypatch.undo()
    make_sink(tmp_path).close()  # the lock was released by the failed open
    assert list((tmp_path / f"run={KEY}").glob(".probe-*")) == []


def test_enospc_keeps_rows_buffered_and_retry_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write_table = pq.write_table
    calls: list[str] = []

    def disk_full(table: pa.Table, where: Any, **kw: Any) -> None:
        calls.append(str(where))
        with open(where, "wb") as f:  # a partial file, as a real failure would leave
            f.write(b"PAR1 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    s = make_sink(tmp_path, rows_per_part=3)
    s.write(make_result("a"))
    s.write(make_result("b"))
    monkeypatch.setattr(writers_mod.pq, "write_table", disk_full)
    with pytest.raises(OutputError, match="no space left on device") as info:
        s.write(make_result("c"))  # reaches rows_per_part: flush fails
    assert str(tmp_path) in str(info.value)
    assert calls and calls[0].endswith(".tmp")
    assert s.buffered == 3
    assert s.parts_written == 0
    assert parts(tmp_path) == []
    assert list((tmp_path / f"run={KEY}" / ".tmp").iterdir()) == []
    with pytest.raises(OutputError):
        s.flush()
    assert s.buffered == 3

    monkeypatch.setattr(writers_mod.pq, "write_table", real_write_table)
    s.write(make_result("d"))  # >= rows_per_part buffered: flushes all four as one part
    assert s.buffered == 0
    assert s.rows_written == 4
    assert s.parts_written == 1
    s.close()
    assert sorted(read_run(tmp_path)["id"].to_pylist()) == ["a", "b", "c", "d"]


def test_replace_failure_removes_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_sink(tmp_path)
    s.write(make_result("a"))

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writers_mod.os, "replace", broken_replace)
    with pytest.raises(OutputError, match="Input/output error"):
        s.flush()
    assert list((tmp_path / f"run={KEY}" / ".tmp").iterdir()) == []
    assert s.buffered == 1
    monkeypatch.undo()
    s.close()
    assert read_run(tmp_path)["id"].to_pylist() == ["a"]


def test_close_failure_keeps_sink_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_sink(tmp_path)
    s.write(make_result("a"))
    monkeypatch.setattr(
        writers_mod.pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(OutputError):
        s.close()
    monkeypatch.undo()
    s.close()
    assert s.rows_written == 1
    assert os.listdir(tmp_path / f"run={KEY}" / ".tmp") == []


def test_resume_keeps_the_column_of_each_manifest_key(tmp_path: Path) -> None:
    extra = {"id": "manifest-id", "extra_id": "taken", "lang": "en"}
    with make_sink(tmp_path) as s:
        s.write(make_result("a", extra=extra))
    with make_sink(tmp_path) as s:
        s.write(make_result("b", extra=extra))
    rows = {r["id"]: r for r in read_run(tmp_path).to_pylist()}
    assert rows["b"]["extra_id"] == "taken" and rows["b"]["extra_extra_id"] == "manifest-id"
    assert rows["b"]["warnings"] is None


def test_layout_functions(tmp_path: Path) -> None:
    assert layout.runs(tmp_path) == [] and layout.part_files(tmp_path, KEY) == []
    with make_sink(tmp_path, rows_per_part=2) as s:
        for i in range(5):
            s.write(make_result(f"i{i}"))
    other = run_key({"other": 1})
    with Sink(tmp_path, other, {}, model="m", task="t") as s:
        s.write(make_result("x"))
    (tmp_path / f"run={KEY}" / "notes.txt").write_text("not a part")
    assert layout.runs(tmp_path) == sorted([KEY, other])
    files = layout.part_files(tmp_path, KEY)
    assert [Path(f).name[:11] for f in files] == ["part-000000", "part-000001", "part-000002"]
    assert layout.rows_on_disk(tmp_path, KEY) == 5 and layout.rows_on_disk(tmp_path, "abc") == 0
    table = layout.read_output(tmp_path)
    assert table.num_rows == 6 and table.schema.names[-1] == "run"
    assert sorted(set(table["run"].to_pylist())) == sorted([KEY, other])


def test_confidence_columns_of_every_kind_of_row(tmp_path: Path) -> None:
    """issue 25b: flags as the result carries them, else by the default rules; null where a row failed."""
    import dataclasses
    import zlib

    from flamingo_cli.records import error_result

    judged = dataclasses.replace(make_result("a"), avg_logprob=-0.4, flags=("truncated",), attempts=3)
    unjudged = dataclasses.replace(make_result("b", caption="key " * 8), avg_logprob=-2.0)
    failed = dataclasses.replace(make_result("c", error="rejected by the engine: x"), avg_logprob=-0.1)
    short = make_result("d")
    short.chunk.error = "too short for a sound token"
    with make_sink(tmp_path) as s:
        for r in (judged, unjudged, failed, short, error_result(AudioItem(id="e", path="/e.wav"), "empty file")):
            s.write(r)
    rows = {r["id"]: r for r in read_run(tmp_path).to_pylist()}
    assert rows["a"]["flags"] == ["truncated"] and rows["a"]["attempts"] == 3 and rows["a"]["avg_logprob"] == -0.4
    assert rows["a"]["compression_ratio"] == pytest.approx(9 / len(zlib.compress(b"a caption")))
    assert rows["b"]["flags"] == ["repetition", "low_confidence"] and rows["b"]["attempts"] == 1
    assert rows["c"]["flags"] is None and rows["c"]["avg_logprob"] is None and rows["c"]["attempts"] == 1
    assert rows["c"]["compression_ratio"] is None
    for key in ("d", "e"):  # never reached the engine
        assert rows[key]["flags"] is None and rows[key]["attempts"] is None
