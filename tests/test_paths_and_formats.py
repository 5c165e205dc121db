"""Issue 16: every file a scan passes over is counted, odd formats decode, and a path is data.

CLI runs use the fake engine of test_reliability (instant, deterministic); audio files in formats
libsndfile cannot read are encoded here with PyAV's encoders.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from audiogen import encode
from conftest import make_audio, read_rows, run_cli
from test_reliability import FakeEngine, caption

from flamingo_cli.errors import OutputError
from flamingo_cli.output.layout import SCAN_FILE, read_scan
from flamingo_cli.paths import escape_path, path_bytes
from flamingo_cli.sink import Sink
from flamingo_cli.sources import HIDDEN, NO_EXTENSION, ScanStats, describe_skipped, iter_items

LATIN1_NAME = b"caf\xe9 \xab live \xbb.wav"  # "café «live».wav" as Latin-1: not valid UTF-8


def unescape(text: str) -> bytes:
    """The inverse of escape_path for an escaped text (what a reader without path_bytes would do)."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif text[i] == "\\" and text[i + 1] == "\\":
            out += b"\\"
            i += 2
        else:
            out += text[i].encode("utf-8")
            i += 1
    return bytes(out)


def odd_folder(root: Path) -> dict[str, Path]:
    """Decodable files in formats a default scan must take, plus files it must pass over and count."""
    root.mkdir(parents=True)
    audio = {
        "a.mp2": encode(root / "a.mp2", 1.0),
        "b.oga": encode(root / "b.oga", 1.0),
        "c.m4a": encode(root / "c.m4a", 1.0),
        "d.wma": encode(root / "d.wma", 1.0),
        "sub/e.amr": encode((root / "sub").mkdir() or root / "sub" / "e.amr", 1.0),
        "f.webm": encode(root / "f.webm", 1.0),
        "g.wav": make_audio(root / "g.wav", 1.0),
    }
    for name in ("x1.xyz", "x2.xyz", "sub/x3.xyz", "notes.txt", "README", ".DS_Store"):
        (root / name).write_text("not audio\n")
    return audio


# --- scanning: the default set, --ext all, the counts ------------------------------------------------------


def test_scan_takes_decodable_formats_and_counts_the_rest(tmp_path: Path) -> None:
    audio = odd_folder(tmp_path / "in")
    stats = ScanStats()
    items = list(iter_items([tmp_path / "in"], stats=stats))
    assert sorted(i.id for i in items) == sorted(audio)
    assert stats.finished
    assert stats.skipped() == {".xyz": 3, HIDDEN: 1, NO_EXTENSION: 1, ".txt": 1}
    assert describe_skipped(stats.skipped()) == "skipped 6 files: .xyz ×3, (hidden) ×1, (none) ×1, .txt ×1"

    every = ScanStats()
    taken = {i.id for i in iter_items([tmp_path / "in"], extensions=["all"], stats=every)}
    assert taken == set(audio) | {"x1.xyz", "x2.xyz", "sub/x3.xyz", "notes.txt", "README"}
    assert every.skipped() == {HIDDEN: 1}  # hidden files are never taken, but still counted


def test_scan_stats_are_thread_safe() -> None:
    stats = ScanStats()

    def add() -> None:
        for i in range(2000):
            stats.skip(f"f{i}.xyz" if i % 2 else "noext")

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.skipped() == {".xyz": 8000, NO_EXTENSION: 8000}
    assert stats.total == 16000


def test_cli_rows_for_every_decodable_file_and_counts_for_the_rest(tmp_path: Path, fake: FakeEngine) -> None:
    audio = odd_folder(tmp_path / "in")
    summary = tmp_path / "summary.json"
    r = caption([tmp_path / "in"], tmp_path / "out", "--summary-json", summary)
    assert r.status == 0, r.stderr
    rows = read_rows(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(audio)
    assert all(r["error"] is None and r["caption"] == f"fake:{r['id']}#0" for r in rows)

    doc = json.loads(summary.read_text())
    assert doc["files_passed_over"] == 6
    assert doc["files_passed_over_by_ext"] == {".xyz": 3, HIDDEN: 1, NO_EXTENSION: 1, ".txt": 1}

    [run_dir] = (tmp_path / "out").glob("run=*")
    scan = read_scan(tmp_path / "out", run_dir.name.split("=", 1)[1])
    assert scan is not None and scan["complete"] and scan["skipped_total"] == 6
    assert (run_dir / SCAN_FILE).exists()  # beside the parts, yet no reader sees it as data:
    assert all(Path(f).name.startswith("part-") for f in ds.dataset(tmp_path / "out", format="parquet").files)

    i = run_cli(["inspect", tmp_path / "out"])
    assert i.status == 0, i.stderr
    assert "skipped 6 files: .xyz ×3, (hidden) ×1, (none) ×1, .txt ×1" in i.stdout
    j = json.loads(run_cli(["inspect", tmp_path / "out", "--json"]).stdout)
    assert j["run_details"][0]["passed_over"][".xyz"] == 3

    plan = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "plan", "--dry-run", "--json"])
    assert plan.status == 0, plan.stderr
    assert json.loads(plan.stdout)["passed_over"] == {".xyz": 3, HIDDEN: 1, NO_EXTENSION: 1, ".txt": 1}
    table = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "plan", "--dry-run"])
    assert "skipped 6 files: .xyz ×3, (hidden) ×1, (none) ×1, .txt ×1" in table.stdout


def test_cli_plain_summary_line_reports_the_counts(tmp_path: Path, fake: FakeEngine) -> None:
    odd_folder(tmp_path / "in")
    from test_reliability import FAKE_ARGS

    args = [a for a in FAKE_ARGS if a != "--quiet"]
    r = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "out", *args])
    assert r.status == 0, r.stderr
    assert "passed_over=6(.xyz:3,(hidden):1,(none):1,.txt:1)" in r.stderr


# --- paths are data -----------------------------------------------------------------------------------------


def test_escape_path_is_lossless_and_valid_utf8() -> None:
    for raw in (LATIN1_NAME, b"back\\slash \xff\\x41.wav", b"plain.wav", "日本語\n-x.wav".encode()):
        text = os.fsdecode(raw)
        escaped = escape_path(text)
        escaped.encode("utf-8")  # never raises
        if path_bytes(text) is None:
            assert escaped == text  # valid UTF-8 names (newlines and all) are kept as they are
        else:
            assert path_bytes(text) == raw
            assert unescape(escaped) == raw


def test_non_utf8_name_among_good_files_captions_every_file(tmp_path: Path, fake: FakeEngine) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_audio(src / "good.wav", 1.0, seed=1)
    make_audio(src / "-dash.flac", 1.0, seed=2)
    make_audio(src / "new\nline.wav", 1.0, seed=3)
    odd = os.path.join(os.fsencode(src), LATIN1_NAME)
    os.rename(make_audio(src / "tmp.wav", 1.0, seed=4), odd)
    odd_m4a = os.path.join(os.fsencode(src), b"\xe9t\xe9.m4a")
    os.rename(encode(src / "tmp.m4a", 1.0), odd_m4a)
    log = tmp_path / "run.log"
    summary = tmp_path / "s.json"

    r = caption([src], tmp_path / "out", "--log-file", log, "--summary-json", summary)
    assert r.status == 0, r.stderr
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    assert len(rows) == 5 and all(row["error"] is None for row in rows.values())
    assert rows["good.wav"]["path_bytes"] is None and rows["new\nline.wav"]["path_bytes"] is None
    for raw in (odd, odd_m4a):
        name = escape_path(os.fsdecode(os.path.basename(raw)))
        assert "\\x" in name and name in rows
        row = rows[name]
        assert row["path_bytes"] == raw  # round-trips to the file
        assert os.path.exists(row["path_bytes"])
        assert row["path"] == escape_path(os.fsdecode(raw)) and unescape(row["path"]) == raw
    assert json.loads(summary.read_text())["status"] == "ok"
    assert "done status=ok" in log.read_text(encoding="utf-8")

    again = caption([src], tmp_path / "out")  # resume: the escaped ids match, nothing is redone
    assert again.status == 0, again.stderr
    assert len(read_rows(tmp_path / "out")) == 5


def test_undecodable_odd_name_gets_an_escaped_error_row(tmp_path: Path, fake: FakeEngine) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_audio(src / "good.wav", 1.0)
    bad = os.path.join(os.fsencode(src), b"broken \xe9.wav")
    with open(bad, "wb") as f:
        f.write(b"this is not audio" * 20)
    r = caption([src], tmp_path / "out")
    assert r.status == 1, r.stderr  # an item failed; the run went on
    rows = {row["id"]: row for row in read_rows(tmp_path / "out")}
    row = rows["broken \\xe9.wav"]
    assert row["error"].startswith(escape_path(os.fsdecode(bad)) + ": not decodable audio")
    assert row["path_bytes"] == bad
    assert rows["good.wav"]["error"] is None

    plan = run_cli(["caption", src, "--out", tmp_path / "out2", "--dry-run", "--json"])
    assert plan.status == 0, plan.stderr
    examples = [p for paths in json.loads(plan.stdout)["problems"].values() for p in paths]
    assert escape_path(os.fsdecode(bad)) in examples


# --- messages -------------------------------------------------------------------------------------------


def test_out_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "results.parquet"
    f.write_text("x")
    with pytest.raises(OutputError, match=r"^--out is a file: .*results\.parquet"):
        Sink(f, "abc123", {}, model="m", task="t")
    with pytest.raises(OutputError, match=r"below: cannot create output directory: .*results\.parquet is a file$"):
        Sink(f / "below", "abc123", {}, model="m", task="t")


def test_cli_out_that_is_a_file_exits_2(tmp_path: Path, fake: FakeEngine) -> None:
    make_audio(tmp_path / "in" / "a.wav", 1.0)
    f = tmp_path / "out.txt"
    f.write_text("x")
    r = caption([tmp_path / "in"], f)
    assert r.status == 2
    assert f"--out is a file: {f}" in r.stderr and ".tmp" not in r.stderr


def test_sink_records_only_a_finished_scan(tmp_path: Path) -> None:
    done = ScanStats()
    done.skip("a.xyz")
    done.finished = True
    with Sink(tmp_path / "out", "abc123", {}, model="m", task="t") as sink:
        sink.scan = done
    run_dir = tmp_path / "out" / "run=abc123"
    assert (run_dir / SCAN_FILE).exists()
    recorded = read_scan(tmp_path / "out", "abc123")
    assert recorded is not None
    assert (recorded["skipped"], recorded["skipped_total"], recorded["complete"]) == ({".xyz": 1}, 1, True)
    partial = ScanStats()  # interrupted before the scan read every input: the complete counts stay
    partial.skip("b.txt")
    with Sink(tmp_path / "out", "abc123", {}, model="m", task="t") as sink:
        sink.scan = partial
    assert read_scan(tmp_path / "out", "abc123")["skipped"] == {".xyz": 1}
    assert not list((run_dir / ".tmp").iterdir())
