"""--out s3://...: the sink against a real S3 server on localhost (moto server mode, s3fs client).

Exactly-once without rename or flock: parts staged under unique keys and committed by a conditional
create in a per-slot commit log; the lock is a lease object (conditional create / replace-if-unchanged)
with expiry and renewal; a writer paused past its lease is fenced out by the log.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import crash_writer
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3_server as s3
import test_reliability as rel
from conftest import make_audio
from conftest import run_cli as rel_run

from flamingo_cli.errors import LockedError, OutputError
from flamingo_cli.output import layout
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sink import Sink

# The local S3 server's fixtures (tests/s3_server.py), used here by name.
s3_server, s3_env, s3_bucket = s3.s3_server, s3.s3_env, s3.s3_bucket
subprocess_env = s3.subprocess_env
TESTS = Path(__file__).parent
REPO = TESTS.parent
KEY = "abcdef123456"


def result(item_id: str, index: int = 0, n: int = 1, extra: dict | None = None) -> Result:
    item = AudioItem(id=item_id, path=f"/a/{item_id}.wav", extra=extra or {})
    chunk = Chunk(item=item, index=index, num_chunks=n, start_s=0.0, end_s=1.0, samples=None, duration_s=1.0)
    return Result(chunk=chunk, prompt="p", caption=f"c:{item_id}#{index}", finish_reason="stop")


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem()


def visible_keys(url: str) -> list[tuple[str, int]]:
    """What a plain reader sees: every parquet object under the prefix (pyarrow over s3fs), hive style."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs = s3fs_client()
    fs.invalidate_cache()
    root = url.split("://", 1)[1]
    if not fs.exists(root):
        return []
    dataset = ds.dataset(root, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet", partitioning="hive")
    if not dataset.files:
        return []
    table = dataset.to_table(columns=["id", "chunk_index"])
    return list(zip(table["id"].to_pylist(), table["chunk_index"].to_pylist(), strict=True))


def test_writes_parts_and_resumes_on_s3_never_a_local_folder(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"s3://{s3_bucket}/caps"
    with Sink(url, KEY, {}, model="m", task="t", rows_per_part=2, columns={"year": "int64"}) as s:
        s.load_index()
        for i in range(5):
            s.write(result(f"a{i}", extra={"year": 2000 + i}))
    assert not (tmp_path / "s3:").exists() and list(tmp_path.iterdir()) == []
    assert layout.runs(url) == [KEY]
    files = layout.part_files(url, KEY)
    assert len(files) == 3 and all(f.startswith(f"s3://{s3_bucket}/caps/run={KEY}/part-") for f in files)
    assert layout.rows_on_disk(url, KEY) == 5
    assert sorted(visible_keys(url)) == [(f"a{i}", 0) for i in range(5)]
    # A resume sees every row and drops the duplicates.
    with Sink(url, KEY, {}, model="m", task="t") as s:
        index = s.load_index()
        assert all(index.is_done(f"a{i}") for i in range(5))
        s.write(result("a0"))
        s.write(result("b0", extra={"year": "x"}))
    assert s.duplicates_dropped == 1
    table = layout.read_output(url)
    assert table.num_rows == 6 and set(table["run"].to_pylist()) == {KEY}
    row = {r["id"]: r for r in table.to_pylist()}["b0"]
    assert row["year"] is None and "year: 'x' is not int64" in row["warnings"]
    meta = layout.read_metadata(files[0])
    assert meta["run_key"] == KEY
    store = s3fs_client()
    staging = f"{s3_bucket}/caps/run={KEY}/_flamingo/staging"
    assert not store.exists(staging) or store.ls(staging, refresh=True) == []


def test_unsupported_store_is_a_clear_error_not_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("gs://bucket/caps", "memory://caps", "hf://datasets/x/y"):
        with pytest.raises(OutputError, match="conditional writes"):
            Sink(url, KEY, {}, model="m", task="t")
    with pytest.raises(OutputError, match="not the bucket alone"):
        Sink("s3://bucket", KEY, {}, model="m", task="t")
    assert list(tmp_path.iterdir()) == []


def test_second_writer_refused_and_a_dead_writers_lease_is_taken_over(
    s3_bucket: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/caps"
    env = {**subprocess_env(s3_env), "PYTHONPATH": str(REPO), "FLAMINGO_LEASE_SECONDS": "3"}
    holder = crash_writer.hold_run(url, KEY, env)
    try:
        time.sleep(4)  # past one lease lifetime: the live holder renews it
        with pytest.raises(LockedError, match="another flamingo process is writing this run"):
            Sink(url, KEY, {}, model="m", task="t")
        with pytest.raises(LockedError, match="this run unsharded"):
            Sink(url, KEY, {}, model="m", task="t", shard=(0, 2))
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(LockedError):  # SIGKILLed: nothing released the lease; it is still unexpired
        Sink(url, KEY, {}, model="m", task="t", lease_seconds=3)
    time.sleep(3.5)
    with Sink(url, KEY, {}, model="m", task="t", lease_seconds=3) as s:  # expired: taken over
        s.write(result("x"))
    assert visible_keys(url) == [("x", 0)]


def test_shards_write_side_by_side_on_s3(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/caps"
    a = Sink(url, KEY, {}, model="m", task="t", shard=(0, 2), rows_per_part=1)
    b = Sink(url, KEY, {}, model="m", task="t", shard=(1, 2), rows_per_part=1)
    with pytest.raises(LockedError, match="shard 0/2"):
        Sink(url, KEY, {}, model="m", task="t", shard=(0, 2))
    with pytest.raises(LockedError, match="shard"):
        Sink(url, KEY, {}, model="m", task="t")
    for i in range(3):
        a.write(result(f"a{i}"))
        b.write(result(f"b{i}"))
    a.close()
    b.close()
    assert sorted(visible_keys(url)) == sorted([(f"a{i}", 0) for i in range(3)] + [(f"b{i}", 0) for i in range(3)])
    assert layout.rows_on_disk(url, KEY) == 6


def test_a_writer_paused_past_its_lease_is_fenced_out(s3_bucket: str) -> None:
    """A (paused: no renewals) loses the lease to B; A's next commit meets B's epoch and stops."""
    url = f"s3://{s3_bucket}/caps"
    a = Sink(url, KEY, {}, model="m", task="t", lease_seconds=1.5, rows_per_part=1)
    a.write(result("a0"))
    a._writer._lease_stop.set()  # what a long GC pause / suspended VM looks like from outside: no renewals
    time.sleep(2.0)
    b = Sink(url, KEY, {}, model="m", task="t", lease_seconds=30, rows_per_part=1)
    assert b.load_index().is_done("a0")
    with pytest.raises(LockedError, match="took over"):
        a.write(result("a1"))
    b.write(result("b0"))
    b.close()
    with pytest.raises(LockedError):
        a.close()  # its buffered row is not committed: B (or the next writer) redoes it
    assert sorted(visible_keys(url)) == [("a0", 0), ("b0", 0)]
    assert sorted(layout.read_output(url)["id"].to_pylist()) == ["a0", "b0"]


# --- exactly once under SIGKILL ------------------------------------------------------------------------


def test_sigkill_at_random_moments_then_resume_is_exactly_once_on_s3(s3_bucket: str, s3_env: dict[str, str]) -> None:
    """SIGKILLs at random moments of a writer to S3, each followed by a resume that takes over the lease.

    After every kill a plain reader (pyarrow over s3fs) sees no key twice; the last writer finishes
    with every key exactly once and no staged part left.
    """
    url = f"s3://{s3_bucket}/caps"
    n_items = 120
    rng = random.Random(20261201)
    # A killed writer's lease must expire before the next one can start: a short lease.
    env = {**subprocess_env(s3_env), "PYTHONPATH": str(REPO), "FLAMINGO_LEASE_SECONDS": "1"}
    zygote = crash_writer.Zygote(url, n_items, env, rows_per_part=4)
    kills = progressed = 0
    last = 0
    try:
        while kills < 6:
            time.sleep(1.2)  # the dead writer's lease expires
            pid, _ = zygote.start()
            time.sleep(rng.uniform(0.0, 0.6))
            zygote.kill(pid)
            kills += 1
            keys = visible_keys(url)
            assert len(keys) == len(set(keys)), "a key is visible twice"
            progressed += len(keys) > last
            last = len(keys)
        time.sleep(1.2)
        zygote.finish()
    finally:
        zygote.close(timeout=60)
    keys = visible_keys(url)
    assert len(keys) == len(set(keys))
    assert set(keys) == crash_writer.expected_keys(n_items)  # the same item/chunk layout as the local writer
    assert layout.rows_on_disk(url, KEY) == len(keys)
    staging = f"{s3_bucket}/caps/run={KEY}/_flamingo/staging"
    fs = s3fs_client()
    fs.invalidate_cache()
    assert not fs.exists(staging) or fs.ls(staging, refresh=True) == []
    assert progressed >= 3, (kills, progressed)


# --- the CLI end to end ----------------------------------------------------------------------------------


def test_cli_captions_to_s3_and_resumes(
    fake: rel.FakeEngine, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = fake
    monkeypatch.chdir(tmp_path)
    audio = tmp_path / "audio"
    for i in range(3):
        make_audio(audio / f"f{i}.wav", 1.0, seed=i)
    url = f"s3://{s3_bucket}/caps"
    res = rel.caption([audio], url)
    assert res.status == 0, res.stderr
    assert not (tmp_path / "s3:").exists()
    assert sorted(k for k, _ in visible_keys(url)) == ["f0.wav", "f1.wav", "f2.wav"]
    engine.requests.clear()
    assert rel.caption([audio], url).status == 0
    assert engine.requests == []  # resumed from the committed parts
    assert "testing-secret" not in res.stderr + res.stdout
    run = layout.runs(url)[0]
    holder = Sink(url, run, {}, model="m", task="t")  # another writer of the same run holds the lease
    try:
        res = rel.caption([audio], url)
        assert res.status == 5, res.stderr
        assert "another flamingo process is writing this run" in res.stderr
    finally:
        holder.close()
    res = rel_run(["inspect", url, "--json"])
    assert res.status == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["rows"], doc["items"], doc["runs"]) == (3, 3, 1) and len(doc["samples"]) == 3
    exported = tmp_path / "current.parquet"
    assert rel_run(["export", url, "--to", str(exported)]).status == 0
    assert sorted(pq.read_table(exported)["id"].to_pylist()) == ["f0.wav", "f1.wav", "f2.wav"]


def test_committed_part_is_copied_into_place_and_an_uncommitted_one_deleted(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two crash windows of a part: after commit before the copy, and after upload before commit."""
    from flamingo_cli.output import objstore

    url = f"s3://{s3_bucket}/caps"
    meta = f"{s3_bucket}/caps/run={KEY}/_flamingo"
    s = Sink(url, KEY, {}, model="m", task="t", rows_per_part=1)
    real_copy = objstore.Store.copy

    def no_copy(self, src, dst):
        raise objstore.StoreError(f"{dst}: cannot copy into place: injected")

    monkeypatch.setattr(objstore.Store, "copy", no_copy)
    with pytest.raises(OutputError, match="injected"):
        s.write(result("a"))
    monkeypatch.setattr(objstore.Store, "copy", real_copy)
    assert visible_keys(url) == []  # committed, but not where plain readers look yet
    assert layout.read_output(url)["id"].to_pylist() == ["a"]  # the index and export read it staged
    fs = s3fs_client()
    fs.pipe_file(f"{meta}/staging/part-000099-all-0badf00d.parquet.staged", b"half a part")  # never committed
    s.close()
    with Sink(url, KEY, {}, model="m", task="t") as s2:
        assert s2.load_index().is_done("a")
    fs.invalidate_cache()
    assert visible_keys(url) == [("a", 0)]
    assert not fs.exists(f"{meta}/staging") or fs.ls(f"{meta}/staging", refresh=True) == []


def test_a_store_that_ignores_conditional_writes_is_refused(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some S3-compatible servers drop If-None-Match: the probe at open finds out and nothing is written."""
    from flamingo_cli.output import objstore

    def create_ignoring_the_condition(self: objstore.Store, path: str, data: bytes) -> str:
        self.put(path, data)
        return "etag"

    monkeypatch.setattr(objstore.Store, "create", create_ignoring_the_condition)
    with pytest.raises(OutputError, match="ignores conditional writes"):
        Sink(f"s3://{s3_bucket}/caps", KEY, {}, model="m", task="t")
    fs = s3fs_client()
    fs.invalidate_cache()
    assert fs.find(s3_bucket) == []  # the probe object is removed again
