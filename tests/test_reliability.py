"""Never lose a night's run (issue #5), without the real engine: crash safety, resume, change detection,
one writer, signals, exit codes, bad input and output faults.

CLI-level tests run ``flamingo caption`` in-process with ``get_engine`` replaced by ``FakeEngine``
(instant, deterministic); the engine-backed versions live in test_reliability_engine.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import crash_writer
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import make_audio, read_rows, run_cli
from fakes import FakeEngine

from flamingo_cli.engine import END, EngineError
from flamingo_cli.errors import OutputError
from flamingo_cli.output.layout import current_rows
from flamingo_cli.records import AudioItem, Fingerprint, error_result
from flamingo_cli.resume import ResumeIndex, fingerprint, source_changed
from flamingo_cli.sink import Sink

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FAKE_ARGS = ["--model", "af3", "--temperature", "0", "--max-tokens", "8", "--quiet"]


# --- a fake engine behind the real CLI ----------------------------------------------------------------


def caption(inputs: list[Any], out: Path, *extra: Any) -> Any:
    return run_cli(["caption", *inputs, "--out", out, *FAKE_ARGS, *extra])


def keys_of(rows: list[dict]) -> Counter:
    return Counter((r["run"], r["id"], r["chunk_index"]) for r in rows)


def current(out: Path) -> list[dict]:
    return current_rows(ds.dataset(out, partitioning="hive", format="parquet").to_table()).to_pylist()


def run_dirs(out: Path) -> list[Path]:
    return sorted(out.glob("run=*"))


def visible_parts_readable(out: Path, checked: dict[Path, int] | None = None) -> int:
    """Every part a reader can see opens and reads whole; returns the row count.

    ``checked`` remembers parts already read whole (parts never change once visible).
    """
    checked = {} if checked is None else checked
    # One listing (a writer may still be adding parts): what the dataset reader found is what is checked.
    dataset = ds.dataset(out, partitioning="hive", format="parquet")
    files = [Path(f) for f in dataset.files]
    strays = [f for f in files if not (f.name.startswith("part-") and f.suffix == ".parquet")]
    assert not strays, strays  # never a temp file or anything half-made
    if not files:  # killed before its first part: nothing visible, and no schema to project
        return 0
    for part in files:
        if part not in checked:
            checked[part] = pq.read_table(part).num_rows
    table = dataset.to_table(columns=["id"])
    assert table.num_rows == sum(checked[f] for f in files)
    return table.num_rows


# --- exactly once under SIGKILL (the sink alone, many kill points) ---------------------------------------

# The writers run in processes forked by tests/crash_writer.py's Zygote (shared with the S3 test).


def _unique_keys(out: Path) -> list[tuple[str, int]]:
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    if not dataset.files:  # killed before its first part
        return []
    table = dataset.to_table(columns=["id", "chunk_index"])
    keys = list(zip(table["id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)), "a key was written twice"
    return keys


def test_sink_sigkill_at_random_points_is_exactly_once(tmp_path: Path) -> None:
    """20 SIGKILLs at random moments of a writer (rows_per_part=1), each followed by a resume.

    After every kill: the dataset reads, every visible part is whole, no (id, chunk) twice, and the
    next writer (which takes over the dead one's lock) cleans the leftover temp part.
    """
    out = tmp_path / "out"
    n_items = 1000  # ~2,500 chunks: no writer finishes inside its 80 ms before the kill
    rng = random.Random(20250605)
    zygote = crash_writer.Zygote(out, n_items, {**os.environ, "PYTHONPATH": str(REPO)}, chunk_errors=True)
    kills = progressed = 0
    checked: dict[Path, int] = {}
    t0 = time.monotonic()
    try:
        while kills < 20:
            pid, before = zygote.start()
            time.sleep(rng.uniform(0.0, 0.08))
            zygote.kill(pid)
            kills += 1
            progressed += visible_parts_readable(out, checked) > before
            _unique_keys(out)
        zygote.finish()  # the last one runs to the end
    finally:
        zygote.close(timeout=30)
    assert set(_unique_keys(out)) == crash_writer.expected_keys(n_items)
    assert not list((out / "run=abcdef123456" / ".tmp").iterdir())
    assert progressed >= 15, (kills, progressed)
    print(f"\n{kills} SIGKILLs ({progressed} after new parts) in {time.monotonic() - t0:.1f} s")


# --- one writer ----------------------------------------------------------------------------------------


def _hold_lock(out: Path, key: str) -> subprocess.Popen:
    return crash_writer.hold_run(out, key, {**os.environ, "PYTHONPATH": str(REPO)})


def test_lock_of_a_killed_writer_is_taken_over(tmp_path: Path) -> None:
    from flamingo_cli.errors import LockedError

    holder = _hold_lock(tmp_path, "abcdef123456")
    try:
        with pytest.raises(LockedError, match="another flamingo process"):
            Sink(tmp_path, "abcdef123456", {}, model="m", task="t")
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead process's flock: no stale-lock cleanup is ever needed.
    assert (tmp_path / "run=abcdef123456" / ".lock").exists()
    with Sink(tmp_path, "abcdef123456", {}, model="m", task="t") as s:
        s.load_index()


def test_second_run_on_the_same_output_exits_5(fake: FakeEngine, tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    make_audio(audio / "a.wav", 1.0)
    out = tmp_path / "out"
    assert caption([audio], out).status == 0
    (run,) = run_dirs(out)
    holder = _hold_lock(out, run.name.removeprefix("run="))
    try:
        calls = fake.results
        res = caption([audio], out)
        assert res.status == 5, res.stderr
        assert "another flamingo process is writing this run" in res.stderr
        assert fake.results == calls  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert caption([audio], out).status == 0  # the stale lock is taken over


# --- change detection: cron over a growing folder ----------------------------------------------------------


def test_source_changed_rules() -> None:
    a = Fingerprint(10, 1000, "aa")
    assert not source_changed(a, Fingerprint(10, 1000, "aa"))
    assert source_changed(a, Fingerprint(11, 1000, "aa"))
    assert source_changed(a, Fingerprint(10, 1001, "aa"))  # touched: mtime decides without --hash
    assert not source_changed(a, Fingerprint(10, 1001, "aa"), content_hash=True)  # same bytes
    assert source_changed(a, Fingerprint(10, 1000, "bb"), content_hash=True)  # same size+mtime, new bytes
    assert not source_changed(a, Fingerprint(10, 1000, None), content_hash=True)  # no hash: size+mtime
    assert not source_changed(a, None)  # unreadable now (mount down, vanished): keep the captions
    assert source_changed(None, a)  # unreadable before, readable now: caption it


def test_fingerprint(tmp_path: Path) -> None:
    p = tmp_path / "x.wav"
    p.write_bytes(b"abc")
    fp = fingerprint(str(p))
    assert fp is not None and fp.size == 3 and fp.mtime_ns == p.stat().st_mtime_ns and fp.sha256 is None
    assert fingerprint(str(p), content_hash=True).sha256 == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert fingerprint(str(tmp_path / "nope.wav")) is None
    assert fingerprint(str(tmp_path)) is None  # not a regular file


def test_incremental_runs_caption_only_new_and_changed_files(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    make_audio(audio / "a.wav", 1.0, seed=1)
    make_audio(audio / "b.wav", 5.0, seed=2)  # 3 chunks of 2 s
    make_audio(audio / "c.wav", 1.0, seed=3)
    args = ["--chunk-seconds", "2", "--no-track-summary"]  # requests counted here are audio ones
    assert caption([audio], out, *args).status == 0
    assert len(fake.requests) == 5

    # Nothing changed: nothing runs.
    fake.requests.clear()
    assert caption([audio], out, *args).status == 0
    assert fake.requests == []

    # A new file, one rewritten shorter (3 chunks -> 1: its old chunks 1, 2 must stop counting),
    # one only touched (same bytes, new mtime).
    make_audio(audio / "d.wav", 1.0, seed=4)
    make_audio(audio / "b.wav", 1.5, seed=5)
    st = (audio / "c.wav").stat()
    os.utime(audio / "c.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fake.requests.clear()
    assert caption([audio], out, *args).status == 0
    assert sorted(fake.requests) == [("b.wav", 0), ("c.wav", 0), ("d.wav", 0)]

    rows = read_rows(out)
    assert len(rows) == 5 + 3  # nothing rewritten: old rows stay
    cur = current(out)
    by_id = {(r["id"], r["chunk_index"]): r for r in cur}
    assert len(cur) == len(by_id) == 4  # a, b (1 chunk now), c, d
    assert by_id[("b.wav", 0)]["source_version"] == 1 and by_id[("b.wav", 0)]["end_s"] == pytest.approx(1.5)
    assert by_id[("c.wav", 0)]["source_version"] == 1
    assert by_id[("a.wav", 0)]["source_version"] == 0
    for r in cur:
        p = audio / r["id"]
        assert (r["source_size"], r["source_mtime_ns"]) == (p.stat().st_size, p.stat().st_mtime_ns)

    # The resume index reads the same way: b is done with 1 chunk.
    with Sink(out, run_dirs(out)[0].name[4:], {}, model="m", task="t") as s:
        idx = s.load_index()
        assert idx.is_done("b.wav") and idx.done_chunks("b.wav") == {0} and idx.version("b.wav") == 1


def test_hash_mode_ignores_touch_and_sees_same_size_edits(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    a = make_audio(audio / "a.wav", 1.0, seed=1)
    b = make_audio(audio / "b.wav", 1.0, seed=2)
    assert caption([audio], out, "--hash").status == 0
    assert {r["source_sha256"] for r in read_rows(out)} == {
        fingerprint(str(a), True).sha256,
        fingerprint(str(b), True).sha256,
    }
    # a: touched only. b: new bytes of the same size, mtime put back (cp -p, rsync -t, restores).
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    st = b.stat()
    data = bytearray(b.read_bytes())
    data[-1] ^= 0x01
    b.write_bytes(bytes(data))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    fake.requests.clear()
    assert caption([audio], out, "--hash").status == 0
    assert fake.requests == [("b.wav", 0)]
    # Without --hash, size + mtime decide: the touched file is redone, the restored one is not seen.
    fake.requests.clear()
    assert caption([audio], out).status == 0
    assert fake.requests == [("a.wav", 0)]


def test_missing_manifest_file_is_captioned_once_it_appears(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nx,audio/x.wav\ny,audio/y.wav\n")
    make_audio(audio / "x.wav", 1.0)
    res = caption([manifest], out)
    assert res.status == 1
    (y,) = [r for r in read_rows(out) if r["id"] == "y"]
    assert "file not found" in y["error"] and y["source_size"] is None
    make_audio(audio / "y.wav", 1.0, seed=1)  # not x's audio (that would be a duplicate, no request)
    fake.requests.clear()
    assert caption([manifest], out).status == 0
    assert fake.requests == [("y", 0)]
    cur = {r["id"]: r for r in current(out)}
    assert cur["y"]["error"] is None and cur["y"]["caption"] == "fake:y#0"
    # Then the file goes away (a mount is down): the caption stays, nothing is redone.
    (audio / "y.wav").unlink()
    fake.requests.clear()
    assert caption([manifest], out).status == 0
    assert fake.requests == [] and {r["id"]: r for r in current(out)}["y"]["caption"] == "fake:y#0"


def test_retry_failed_reruns_only_error_rows(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(4):
        make_audio(audio / f"f{i}.wav", 1.0, seed=i)
    (audio / "bad.wav").write_bytes(b"not audio at all")
    fake.fail_ids = {"f1.wav", "f3.wav"}
    assert caption([audio], out).status == 1
    fake.fail_ids = set()
    fake.requests.clear()
    assert caption([audio], out).status == 0  # plain resume: errors are results, nothing reruns
    assert fake.requests == []
    assert caption([audio], out, "--retry-failed").status == 1  # bad.wav still fails
    assert sorted(fake.requests) == [("f1.wav", 0), ("f3.wav", 0)]
    cur = {r["id"]: r for r in current(out)}
    assert cur["f1.wav"]["caption"] == "fake:f1.wav#0" and cur["f1.wav"]["error"] is None
    assert "not decodable" in cur["bad.wav"]["error"]
    assert len(read_rows(out)) == 5 + 3  # the old error rows stay; readers take the latest
    fake.requests.clear()
    assert caption([audio], out, "--retry-failed").status == 1
    assert fake.requests == []  # only bad.wav is left, and it fails before the engine


def test_changing_model_task_prompt_or_sampling_starts_a_separate_run(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    make_audio(audio / "a.wav", 1.0)
    variants = [
        [],
        ["--prompt", "List the instruments."],
        ["--temperature", "0.7"],
        ["--max-tokens", "9"],
        ["--seed", "3"],
        ["--chunk-seconds", "10"],
        ["--model", "mf"],
    ]
    for extra in variants:
        assert caption([audio], out, *extra).status == 0
    assert len(run_dirs(out)) == len(variants)
    for extra in variants:  # the same options again find their run: nothing new
        assert caption([audio], out, *extra).status == 0
    assert len(run_dirs(out)) == len(variants) and len(read_rows(out)) == len(variants)
    assert {r["task"] for r in read_rows(out)} == {"caption"}


# --- resume index: versions, legacy parts, the reading rule ---------------------------------------------


def _t(rows: list[dict]) -> pa.Table:
    from flamingo_cli.output.layout import SCHEMA

    full = [{name: r.get(name) for name in SCHEMA.names} for r in rows]
    for r in full:
        r["created_at"] = r["created_at"] or 0
    return pa.Table.from_pylist(full, schema=SCHEMA)


def test_index_and_reader_take_the_latest_version() -> None:
    rows = [
        # v0: 3 chunks, then the file changed and v1 has 1 chunk: chunks 1, 2 of v0 are stale.
        *[dict(id="b", chunk_index=c, num_chunks=3, source_version=0, source_size=9, created_at=c) for c in range(3)],
        dict(id="b", chunk_index=0, num_chunks=1, source_version=1, source_size=4, created_at=10),
        # v1 of c is only partly written (a crash): c is not done; chunk 0 of v1 is.
        *[dict(id="c", chunk_index=k, num_chunks=2, source_version=0, created_at=k) for k in range(2)],
        dict(id="c", chunk_index=0, num_chunks=2, source_version=1, created_at=5),
        # a retry within one version: the later row wins.
        dict(id="d", chunk_index=0, num_chunks=1, source_version=0, error="boom", created_at=1),
        dict(id="d", chunk_index=0, num_chunks=1, source_version=0, caption="ok", created_at=2),
    ]
    idx = ResumeIndex(_t(rows))
    assert idx.is_done("b") and idx.done_chunks("b") == {0} and idx.version("b") == 1
    assert idx.recorded_source("b") is None  # size without mtime: not a usable fingerprint
    assert not idx.is_done("c") and idx.done_chunks("c") == {0} and idx.version("c") == 1
    assert idx.is_done("d") and not idx.is_failed("d")
    cur = current_rows(_t(rows)).to_pylist()
    got = sorted((r["id"], r["chunk_index"], r["source_version"], r["created_at"].timestamp()) for r in cur)
    assert [g[:3] for g in got] == [("b", 0, 1), ("c", 0, 1), ("d", 0, 0)]
    assert [r["caption"] for r in cur if r["id"] == "d"] == ["ok"]


def test_legacy_parts_without_source_columns_are_not_redone(tmp_path: Path) -> None:
    """Parts written before versions existed: their items count as unchanged (not a full rerun)."""
    legacy = pa.table(
        {
            "id": ["a"],
            "chunk_index": pa.array([0], pa.int32()),
            "num_chunks": pa.array([1], pa.int32()),
            "error": pa.array([None], pa.string()),
        }
    )
    idx = ResumeIndex(legacy)
    assert idx.is_done("a") and idx.version("a") is None and not idx.source_recorded("a")
    run = tmp_path / "run=abcdef123456"
    run.mkdir()
    pq.write_table(legacy, run / "part-000000-00000000.parquet")
    with Sink(tmp_path, "abcdef123456", {}, model="m", task="t") as s:
        assert s.load_index().is_done("a")


# --- signals, engine faults, aborted requests (in-process, fake engine) ------------------------------------


def test_sigterm_stops_cleanly_exit_143_and_resume_finishes(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(30):
        make_audio(audio / f"f{i:02d}.wav", 0.5, seed=i)
    fake.after[3] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    res = caption([audio], out, "--rows-per-part", "2")
    assert res.status == 143, res.stderr
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    rows = read_rows(out)
    assert 3 <= len(rows) < 30  # finished rows flushed (an odd one too), queued ones dropped
    assert not list(out.glob("run=*/.tmp/*"))
    fake.after.clear()
    fake.requests.clear()
    assert caption([audio], out).status == 0
    assert len(fake.requests) == 30 - len(rows)
    assert sorted(keys_of(read_rows(out)).values()) == [1] * 30


def test_engine_dying_is_exit_3_and_resume_works(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(10):
        make_audio(audio / f"f{i}.wav", 0.5, seed=i)

    def die() -> None:
        raise EngineError("the vLLM engine failed: EngineDeadError: injected")

    fake.after[4] = die
    res = caption([audio], out, "--rows-per-part", "3")
    assert res.status == 3
    assert "EngineDeadError" in res.stderr and "run the same command to resume" in res.stderr
    assert len(read_rows(out)) == 4  # every finished row, including the unfinished part's
    fake.after.clear()
    assert caption([audio], out).status == 0
    assert sorted(keys_of(read_rows(out)).values()) == [1] * 10


def test_engine_dying_after_a_signal_reports_the_signal(fake: FakeEngine, tmp_path: Path) -> None:
    """Ctrl-C / systemd stop reach vLLM's engine process too; it quits, which is not an engine fault."""
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(6):
        make_audio(audio / f"f{i}.wav", 0.5, seed=i)

    def interrupt_then_die() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        raise EngineError("the vLLM engine failed: EngineDeadError")

    fake.after[2] = interrupt_then_die
    res = caption([audio], out)
    assert res.status == 130, res.stderr
    assert len(read_rows(out)) == 2


def test_aborted_results_are_not_written(tmp_path: Path) -> None:
    from flamingo_cli.engine import Sampling
    from flamingo_cli.models import AF3
    from flamingo_cli.pipeline import CaptionJob, run_pipeline
    from flamingo_cli.prompts import PromptBuilder

    class Aborting(FakeEngine):
        def run(self, feed, sampling, on_step=None):
            for r in super().run(feed, sampling, on_step):
                if r.chunk.item.id == "f1.wav":
                    r.finish_reason, r.caption = "abort", "half a capt"
                yield r

    for i in range(3):
        make_audio(tmp_path / "a" / f"f{i}.wav", 0.5, seed=i)
    job = CaptionJob([], PromptBuilder(AF3), "Describe.", 600.0, Sampling(max_tokens=8))
    from flamingo_cli.sources import iter_items

    with Sink(tmp_path / "out", "abcdef123456", {}, model="m", task="t") as sink:
        stats = run_pipeline(job, iter_items([tmp_path / "a"]), Aborting(), sink, index=sink.load_index())
    assert stats.chunks_dropped == 1
    assert sorted(r["id"] for r in read_rows(tmp_path / "out")) == ["f0.wav", "f2.wav"]


_SECOND_SIGNAL = textwrap.dedent(
    """
    import queue, sys, time
    sys.path.insert(0, sys.argv[1])
    import flamingo_cli.engine, flamingo_cli.prompts
    from test_reliability import FakeEngine

    class Stuck(FakeEngine):
        def run(self, feed, sampling, on_step=None):
            for r in super().run(feed, sampling, on_step):
                yield r
                if self.results == 3:
                    print("stuck", flush=True)
                    while True:  # an engine step that never returns (a hung GPU)
                        time.sleep(0.01)

    engine = Stuck()
    flamingo_cli.prompts.load_chat_template = lambda model: None
    from flamingo_cli.cli import main
    from flamingo_cli.env import Environment
    sys.exit(main(sys.argv[2:], env=Environment(engine=engine)))
    """
)


def test_second_ctrl_c_quits_at_once_without_corrupting_output(tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(8):
        make_audio(audio / f"f{i}.wav", 0.5, seed=i)
    args = ["caption", str(audio), "--out", str(out), *FAKE_ARGS, "--rows-per-part", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SECOND_SIGNAL, str(TESTS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "stuck"
    proc.send_signal(signal.SIGINT)  # first: stop feeding, wait for in-flight (which never finishes)
    time.sleep(0.5)
    assert proc.poll() is None
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)  # second: quit now
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert time.monotonic() - t0 < 5
    assert "quitting now" in err
    assert visible_parts_readable(out) == 2  # the first full part; buffered rows are redone on resume


# --- output faults ---------------------------------------------------------------------------------------


def test_disk_full_is_exit_4_no_corrupt_part_and_resume_completes(
    fake: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flamingo_cli.output.writers as writers_mod

    audio, out = tmp_path / "audio", tmp_path / "out"
    for i in range(12):
        make_audio(audio / f"f{i:02d}.wav", 0.5, seed=i)
    real_write = writers_mod.pq.write_table
    calls = {"n": 0}

    def write_table(table, where, **kw):  # the 4th part hits a full disk halfway through
        calls["n"] += 1
        if calls["n"] >= 4:
            with open(where, "wb") as f:
                f.write(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(writers_mod.pq, "write_table", write_table)
    res = caption([audio], out, "--rows-per-part", "2")
    assert res.status == 4, res.stderr
    assert "no space left on device" in res.stderr and "resume" in res.stderr
    assert visible_parts_readable(out) == 6
    assert not list(out.glob("run=*/.tmp/*"))
    monkeypatch.setattr(writers_mod.pq, "write_table", real_write)  # space is back
    assert caption([audio], out, "--rows-per-part", "2").status == 0
    assert sorted(keys_of(read_rows(out)).values()) == [1] * 12


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_real_full_disk_on_a_small_tmpfs(fake: FakeEngine, tmp_path: Path) -> None:
    out = tmp_path / "small"
    if not _can_mount_tmpfs(out):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); injected ENOSPC covers it")
    try:
        audio = tmp_path / "audio"
        for i in range(40):
            make_audio(audio / f"f{i:02d}.wav", 0.5, seed=i)
        (out / ".filler").write_bytes(b"\0" * (256 * 1024 - 40 * 1024))  # ~40 kB left
        res = caption([audio], out, "--rows-per-part", "1")
        assert res.status == 4, res.stderr
        assert "no space left on device" in res.stderr
        n = visible_parts_readable(out)
        assert 0 < n < 40
        (out / ".filler").unlink()  # space is back
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        assert caption([audio], out, "--rows-per-part", "1").status == 0
        assert sorted(keys_of(read_rows(out)).values()) == [1] * 40
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_out_under_a_regular_file_is_exit_2_before_the_model_loads(
    fake: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flamingo_cli.launch

    def no_engine(config):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(flamingo_cli.launch, "get_engine", no_engine)
    monkeypatch.setattr(fake, "run", no_engine)
    make_audio(tmp_path / "a.wav", 0.5)
    (tmp_path / "file").write_text("x")
    res = caption([tmp_path / "a.wav"], tmp_path / "file" / "out")
    assert res.status == 2 and "cannot create output directory" in res.stderr
    assert f"{tmp_path / 'file'} is a file" in res.stderr and ".tmp" not in res.stderr


def test_unwritable_out_as_another_user_is_exit_2(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    base = Path("/tmp") / f"flamingo-ro-{os.getpid()}"
    base.mkdir(mode=0o755, exist_ok=True)
    try:
        make_audio(base / "audio" / "a.wav", 0.5)
        for d in (base, base / "audio"):
            os.chmod(d, 0o755)
        os.chmod(base / "audio" / "a.wav", 0o644)
        out = base / "out"
        out.mkdir(mode=0o755)  # root's: nobody cannot write here
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "flamingo_cli"]
        cmd += ["caption", str(base / "audio"), "--out", str(out), "--model", "af3", "--quiet"]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HOME": "/tmp"})
        if "Permission denied" in r.stderr and "python" in r.stderr.lower() and r.returncode not in (2,):
            pytest.skip(f"nobody cannot run this venv's python: {r.stderr[-300:]}")
        assert r.returncode == 2, r.stderr
        assert "permission denied" in r.stderr and str(out) in r.stderr
        assert time.monotonic() - t0 < 30  # no model load
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- bad input ----------------------------------------------------------------------------------------


def test_file_vanished_between_scan_and_decode(tmp_path: Path) -> None:
    from flamingo_cli.engine import Sampling
    from flamingo_cli.models import AF3
    from flamingo_cli.pipeline import CaptionJob, run_pipeline
    from flamingo_cli.prompts import PromptBuilder
    from flamingo_cli.sources import iter_items

    for i in range(3):
        make_audio(tmp_path / "a" / f"f{i}.wav", 0.5, seed=i)
    items = list(iter_items([tmp_path / "a"]))  # the scan saw all three
    (tmp_path / "a" / "f1.wav").unlink()
    job = CaptionJob([], PromptBuilder(AF3), "Describe.", 600.0, Sampling(max_tokens=8))
    with Sink(tmp_path / "out", "abcdef123456", {}, model="m", task="t") as sink:
        run_pipeline(job, iter(items), FakeEngine(), sink, index=sink.load_index())
    rows = {r["id"]: r for r in read_rows(tmp_path / "out")}
    assert rows["f0.wav"]["caption"] and rows["f2.wav"]["caption"]
    assert rows["f1.wav"]["error"] == f"{tmp_path / 'a' / 'f1.wav'}: file not found"
    assert rows["f1.wav"]["source_size"] is None


def test_three_hour_flac_decodes_and_chunks_into_19_af3_chunks(tmp_path: Path) -> None:
    from flamingo_cli.audio import decode, probe_duration
    from flamingo_cli.chunking import chunk_audio, chunk_spans

    path = tmp_path / "long.flac"
    sr, seconds = 8000, 3 * 3600 + 60
    block = np.zeros(sr * 600, dtype=np.int16)
    with sf.SoundFile(str(path), "w", sr, 1, "PCM_16", format="FLAC") as f:
        left = sr * seconds
        while left > 0:
            f.write(block[: min(left, block.size)])
            left -= block.size
    assert probe_duration(str(path)) == seconds
    plan = chunk_spans(seconds, 600)
    assert plan.num_chunks == 19 and max(e - s for s, e in plan.spans) <= 600
    decoded = decode(AudioItem(id="long", path=str(path)))
    chunks = chunk_audio(decoded, 600)
    assert [(c.start_s, c.end_s) for c in chunks] == plan.spans
    assert all(c.error is None and len(c.samples) <= 600 * 16000 for c in chunks)


def make_bad_corpus(root: Path) -> dict[str, Any]:
    """Every kind of bad (and awkward but good) input in one folder plus one manifest.

    Returns {id: expected} where expected is "ok", ("error", substring) or ("chunk-error", substring).
    """
    audio = root / "corpus"
    exp: dict[str, Any] = {}

    def ok(name: str, seconds: float = 1.0, sr: int = 16000, channels: int = 1, **kw: Any) -> Path:
        p = make_audio(audio / name, seconds, sr, channels, seed=len(exp), **kw)
        exp[name] = "ok"
        return p

    for ch in range(1, 9):
        ok(f"ch{ch}.wav", 0.5, 16000, ch)
    for sr in (8000, 11025, 22050, 32000, 44100, 48000, 96000, 192000):
        ok(f"sr{sr}.flac", 0.5, sr)
    ok("uni ñ 音楽 space.wav")
    ok("new\nline.wav")
    ok("sub dir/ogg file.ogg", 1.0, 22050)
    sf.write(str(audio / "silence.wav"), np.zeros(16000, dtype=np.float32), 16000)
    exp["silence.wav"] = "silence"  # digital silence: a row without an engine request (gates.py)

    (audio / "zero.wav").write_bytes(b"")
    exp["zero.wav"] = ("error", "empty file (0 bytes)")
    good = make_audio(root / "tmp-src.wav", 2.0)
    (audio / "trunc-header.wav").write_bytes(good.read_bytes()[:20])
    exp["trunc-header.wav"] = ("error", "not decodable audio")
    raw = bytearray(good.read_bytes())
    raw[8:16] = b"JUNKJUNK"  # "WAVEfmt " mangled
    (audio / "corrupt-header.wav").write_bytes(bytes(raw))
    exp["corrupt-header.wav"] = ("error", "not decodable audio")
    (audio / "text.mp3").write_text("hello, this is a text file\n" * 40)
    exp["text.mp3"] = ("error", "not decodable audio")
    (audio / "image.flac").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    exp["image.flac"] = ("error", "not decodable audio")
    # A WAV whose format tag names a codec nobody here decodes (0x1234).
    raw = bytearray(good.read_bytes())
    raw[20:22] = (0x1234).to_bytes(2, "little")
    (audio / "codec.wav").write_bytes(bytes(raw))
    exp["codec.wav"] = ("error", "not decodable audio")
    x = np.zeros(16000, dtype=np.float32)
    x[100] = np.nan
    sf.write(str(audio / "nan.wav"), x, 16000, subtype="FLOAT")
    exp["nan.wav"] = ("error", "NaN or infinite")
    x[100] = np.inf
    sf.write(str(audio / "inf.wav"), x, 16000, subtype="FLOAT")
    exp["inf.wav"] = ("error", "NaN or infinite")
    sf.write(str(audio / "tiny.wav"), np.full(100, 0.1, dtype=np.float32), 16000)
    exp["tiny.wav"] = ("chunk-error", "audio too short")
    (audio / "dir.wav").mkdir()
    exp["dir.wav"] = ("error", "is a directory")
    os.symlink(audio / "gone.wav", audio / "dangling.wav")
    exp["dangling.wav"] = ("error", "broken symlink")
    noperm = make_audio(audio / "noperm.wav", 0.5)
    os.chmod(noperm, 0)
    exp["noperm.wav"] = ("error", "permission denied")
    (root / "tmp-src.wav").unlink()

    # The manifest: a BOM, an extra column, a bad row, a duplicate id, a missing file, a bad offset,
    # a per-row prompt too long for the model (the engine rejects it; the job goes on).
    huge = " ".join(str(i) for i in range(17000))  # > max_model_len tokens, < csv's 128 KiB field limit
    manifest = root / "manifest.csv"
    manifest.write_text(
        "\ufeffid,path,genre,offset,prompt\n"
        "m-good,corpus/ch1.wav,jazz,,\n"
        "m-good,corpus/ch2.wav,rock,,\n"
        'm-bad-row,corpus/ch1.wav,"a",1,x,EXTRA\n'
        "m-missing,corpus/nowhere.wav,pop,,\n"
        "m-offset,corpus/ch1.wav,pop,abc,\n"
        f"m-huge,corpus/ch3.wav,pop,,{huge}\n",
        encoding="utf-8",
    )
    exp["m-good"] = "ok"
    exp["m-good#1"] = ("error", "duplicate id 'm-good'")
    exp["manifest.csv:row4"] = ("error", "expected 5 fields, got 6")
    exp["m-missing"] = ("error", "file not found")
    exp["m-offset"] = ("error", "offset is not a number")
    exp["m-huge"] = ("engine-error", "rejected by the engine")
    return {"inputs": [audio, manifest], "expected": exp, "root": audio}


def check_bad_corpus(rows: list[dict], corpus: dict[str, Any], real_engine: bool) -> None:
    exp = corpus["expected"]
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert set(by_id) == set(exp), set(by_id) ^ set(exp)
    root = corpus["root"]
    for item_id, want in exp.items():
        got = by_id[item_id]
        if want == "ok":
            assert all(r["error"] is None and isinstance(r["caption"], str) for r in got), (item_id, got)
            continue
        if want == "silence":
            assert all(r["gate"] == "silence" and r["caption"] is None and r["error"] is None for r in got), got
            continue
        kind, text = want
        if kind == "engine-error" and not real_engine:  # the fake engine takes any prompt
            assert got[0]["error"] is None
            continue
        (row,) = got
        assert row["error"] is not None and text in row["error"], (item_id, row["error"])
        if kind == "error" and not item_id.startswith("m"):
            assert str(root / item_id) in row["error"]  # names the file
            assert row["num_chunks"] == 0
    assert by_id["m-good"][0]["genre"] == "jazz"


@pytest.fixture
def bad_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    corpus = make_bad_corpus(tmp_path)
    if os.access(corpus["root"] / "noperm.wav", os.R_OK):  # root: simulate the denied open
        import builtins

        import flamingo_cli.audio

        real_open = builtins.open

        def guarded_open(file, *a, **kw):
            if str(file).endswith("noperm.wav"):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *a, **kw)

        monkeypatch.setattr(flamingo_cli.audio, "open", guarded_open, raising=False)
    return corpus


def test_bad_corpus_fake_engine(fake: FakeEngine, bad_corpus: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = caption(bad_corpus["inputs"], out)
    assert res.status == 1, res.stderr
    check_bad_corpus(read_rows(out), bad_corpus, real_engine=False)


def test_manifest_without_a_path_column_is_a_usage_error(fake: FakeEngine, tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("\ufeffid,genre\na,jazz\n")
    res = caption([m], tmp_path / "out")
    assert res.status == 2 and "no path column" in res.stderr


def test_pipeline_feed_is_ended_on_stop() -> None:
    from flamingo_cli.pipeline import _end_feed

    feed: queue.Queue = queue.Queue(maxsize=3)
    for i in range(3):
        feed.put(i)
    assert _end_feed(feed) == 3
    assert feed.get_nowait() is END

    # A put racing with the stop lands before or after END; END still gets in.
    feed = queue.Queue(maxsize=1)
    feed.put("x")
    t = threading.Thread(target=lambda: feed.put("y"))
    t.start()
    assert _end_feed(feed) >= 1
    seen = []
    while t.is_alive() or not feed.empty():
        with contextlib.suppress(queue.Empty):
            seen.append(feed.get(timeout=0.05))
    t.join()
    assert END in seen


def test_sink_failed_close_does_not_hide_the_first_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flamingo_cli.output.writers as writers_mod

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    s = Sink(tmp_path, "abcdef123456", {}, model="m", task="t", rows_per_part=10)
    s.write(error_result(AudioItem("a", "/a.wav"), "x"))
    monkeypatch.setattr(writers_mod.pq, "write_table", full)
    with pytest.raises(RuntimeError, match="first"), s:
        raise RuntimeError("first")
    with pytest.raises(OutputError, match="no space left"):
        s.close()
