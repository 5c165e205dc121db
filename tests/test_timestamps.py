"""Timestamps in generated text → typed segments (flamingo_cli/timestamps.py), and the ``segments``
column they become: absolute times for later chunks and for manifest segments, read by every reader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import soundfile as sf
from audiogen import tone
from conftest import read_rows, run_cli

from flamingo_cli.timestamps import clock, parse, to_seconds

# (text, [(start_s, end_s, text)]) with base 0 and the chunk ending at 100 s.
TABLE = [
    (
        "0:00-0:30: intro with piano\n0:30-1:05: verse, drums enter\n1:05 - 2:10: chorus",
        [(0.0, 30.0, "intro with piano"), (30.0, 65.0, "verse, drums enter"), (65.0, 130.0, "chorus")],
    ),
    ("[00:30-01:05] crowd noise\n[01:05-01:40] speech", [(30.0, 65.0, "crowd noise"), (65.0, 100.0, "speech")]),
    ("(0:30 - 1:05) a dog barks. (1:05 – 1:20) silence", [(30.0, 65.0, "a dog barks."), (65.0, 80.0, "silence")]),
    (
        "From 0:00 to 0:15 the intro plays, then from 0:15 to 0:40 a verse.",
        [(0.0, 15.0, "the intro plays,"), (15.0, 40.0, "a verse.")],
    ),
    ("At 0:12 a door slams. At 0:45 a car passes.", [(12.0, 45.0, "a door slams."), (45.0, 100.0, "a car passes.")]),
    ("[12.5 s] a bell rings\n[20 s] it stops", [(12.5, 20.0, "a bell rings"), (20.0, 100.0, "it stops")]),
    ("A bell at 12.5s, then a gong.", [(12.5, 100.0, "then a gong.")]),
    ("1. 0:00-0:20 - intro\n2. 0:20-1:00 - verse", [(0.0, 20.0, "intro"), (20.0, 60.0, "verse")]),
    ("- 0:00–0:10: rain\n- 0:10 to 0:25: thunder", [(0.0, 10.0, "rain"), (10.0, 25.0, "thunder")]),
    ("1:02:03 - 1:02:30 the end", [(3723.0, 3750.0, "the end")]),
    ("0:05.5 a click", [(5.5, 100.0, "a click")]),
    ("12-20 s: applause", [(12.0, 20.0, "applause")]),
    ("from 3 to 5 seconds a beep", [(3.0, 5.0, "a beep")]),
    ("Scene 1 [0:00—0:40]: a street", [(0.0, 40.0, "a street")]),
    # Not timestamps: decades, ratios, tempo, metre, versions, a date's time.
    ("80s synth-pop at 120 bpm in 4/4 with a 1980s vibe, 16:9, v1.2", []),
    ("Recorded 2024-01-02 12:30:00 in a hall", []),
    ("no times here", []),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_real_world_timestamp_formats(text: str, expected: list[tuple[float, float, str]]) -> None:
    got = [(s.start_s, s.end_s, s.text) for s in parse(text, 0.0, 100.0)]
    assert got == expected


def test_base_is_added_and_points_end_at_the_next_start_or_the_chunk_end() -> None:
    got = [(s.start_s, s.end_s, s.text) for s in parse("0:10 a\n0:20-0:25 b\n0:40 c", 600.0, 1200.0)]
    assert got == [(610.0, 620.0, "a"), (620.0, 625.0, "b"), (640.0, 1200.0, "c")]
    assert parse(None) == []


def test_clock_and_seconds() -> None:
    assert [to_seconds(t) for t in ("1:02:03", "1:05.5", "12.5 s", "30 seconds", "07:00")] == [
        3723.0,
        65.5,
        12.5,
        30.0,
        420.0,
    ]
    assert [clock(s) for s in (0, 65.4, 3723)] == ["0:00", "1:05", "1:02:03"]


def _long_tone(path: Path, seconds: float) -> Path:
    sf.write(path, tone(16000, seconds, 1, 220.0)[0], 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def long_track(tmp_path_factory) -> Path:
    """25 minutes at 16 kHz: three chunks under AF3's 600-s cap (0-510, 510-1020, 1020-1500)."""
    return _long_tone(tmp_path_factory.mktemp("long") / "long.wav", 1500.0)


def test_segments_are_in_track_time_for_later_chunks_and_manifest_segments(
    fake, long_track: Path, tmp_path: Path
) -> None:
    fake.caption = lambda request: "0:10-0:20: a tone\n0:30: more tone"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "seg", "path": str(long_track), "offset": 100.0, "duration": 700.0}) + "\n")
    out = tmp_path / "out"
    for inputs in ([long_track], [manifest]):
        r = run_cli(["caption", *inputs, "--out", out, "--quiet", "--no-track-summary"])
        assert r.status == 0, r.stderr
    rows = {(r["id"], r["chunk_index"]): r for r in read_rows(out)}

    def spans(key: tuple[str, int]) -> list[tuple[float, float, str]]:
        return [(s["start_s"], s["end_s"], s["text"]) for s in rows[key]["segments"]]

    assert spans(("long.wav", 0)) == [(10.0, 20.0, "a tone"), (30.0, 510.0, "more tone")]
    assert spans(("long.wav", 1)) == [(520.0, 530.0, "a tone"), (540.0, 1020.0, "more tone")]
    assert spans(("long.wav", 2)) == [(1030.0, 1040.0, "a tone"), (1050.0, 1500.0, "more tone")]
    # The manifest segment starts 100 s into the file: chunks 0-360 and 360-700 of the item.
    assert spans(("seg", 0)) == [(110.0, 120.0, "a tone"), (130.0, 460.0, "more tone")]
    assert spans(("seg", 1)) == [(470.0, 480.0, "a tone"), (490.0, 800.0, "more tone")]
    assert {r["level"] for r in rows.values()} == {"chunk"}


def test_no_timestamps_is_an_empty_list_and_errors_are_null(fake, tmp_path: Path) -> None:
    from conftest import make_audio

    make_audio(tmp_path / "in" / "ok.wav", 2.0)
    (tmp_path / "in" / "bad.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    r = run_cli(["caption", tmp_path / "in", "--out", out, "--quiet"])
    assert r.status == 1, r.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["ok.wav"]["segments"] == [] and rows["ok.wav"]["level"] == "chunk"
    assert rows["bad.wav"]["segments"] is None and rows["bad.wav"]["level"] == "chunk"


READERS = ["pandas", "polars", "duckdb", "datasets"]


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_sees_a_list_of_structs(fake, reader: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(reader) is None:
        pytest.skip(f"{reader} is not installed")
    from conftest import make_audio

    fake.caption = lambda request: "[0:01-0:02] a beep"
    make_audio(tmp_path / "in" / "a.wav", 3.0)
    out = tmp_path / "out"
    assert run_cli(["caption", tmp_path / "in", "--out", out, "--quiet"]).status == 0
    parts = sorted(str(p) for p in out.rglob("*.parquet"))
    want = [{"start_s": 1.0, "end_s": 2.0, "text": "a beep"}]
    if reader == "pandas":
        import pandas as pd

        value = pd.read_parquet(parts[0])["segments"].iloc[0]
        assert [dict(s) for s in value] == want
    elif reader == "polars":
        import polars as pl

        frame = pl.read_parquet(parts[0])
        assert frame.schema["segments"] == pl.List(
            pl.Struct({"start_s": pl.Float64, "end_s": pl.Float64, "text": pl.String})
        )
        assert frame["segments"].to_list()[0] == want
    elif reader == "duckdb":
        import duckdb

        con = duckdb.connect()
        got = con.execute(f"SELECT s.start_s, s.end_s, s.text FROM (SELECT unnest(segments) AS s FROM '{parts[0]}')")
        assert got.fetchall() == [(1.0, 2.0, "a beep")]
    else:
        import datasets

        data = datasets.load_dataset("parquet", data_files=parts, split="train")
        assert data[0]["segments"] == want
