"""Static sharding (``--shard i/N``): a stable partition, shards side by side in one output, locks.

CLI runs use the instant ``FakeEngine`` of test_reliability.py behind the real pipeline and sink.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_audio, read_rows, run_cli
from test_reliability import FAKE_ARGS, FakeEngine

from flamingo_cli.errors import LockedError
from flamingo_cli.manifests import SourceError
from flamingo_cli.records import AudioItem
from flamingo_cli.sink import Sink
from flamingo_cli.sources import parse_shard, select_shard, shard_of


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("3/8") == (3, 8)
    for bad in ["8/8", "-1/4", "1", "a/b", "1/0", "1/-2", ""]:
        with pytest.raises(SourceError, match="--shard"):
            parse_shard(bad)


def test_shards_partition_the_items_evenly() -> None:
    items = [AudioItem(id=f"track {i:05d}.flac", path=f"/x/{i}") for i in range(4000)]
    shards = [list(select_shard(items, i, 4)) for i in range(4)]
    ids = [it.id for shard in shards for it in shard]
    assert sorted(ids) == sorted(it.id for it in items)  # every item in exactly one shard
    assert all(800 <= len(s) <= 1200 for s in shards), [len(s) for s in shards]
    assert list(select_shard(items, 0, 1)) == items


def test_the_partition_is_the_same_in_every_process() -> None:
    """Hosts must agree without talking: no per-process hash seed (PYTHONHASHSEED) may move an id."""
    ids = ["a.wav", "ünïcode dir/b.mp3", "x" * 300]
    here = [shard_of(i, 7) for i in ids]
    code = f"from flamingo_cli.sources import shard_of; print([shard_of(i, 7) for i in {ids!r}])"
    for seed in ("0", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])},
        )
        assert out.stdout.strip() == str(here)


def _corpus(tmp_path: Path, n: int = 12) -> Path:
    audio = tmp_path / "audio"
    for i in range(n):
        make_audio(audio / f"t{i:02d}.wav", 0.5 + 0.1 * i)
    return audio


def test_shards_fill_one_output_exactly_once(fake: FakeEngine, tmp_path: Path) -> None:
    audio, out = _corpus(tmp_path), tmp_path / "out"
    for i in range(3):
        res = run_cli(["caption", audio, "--out", out, *FAKE_ARGS, "--shard", f"{i}/3"])
        assert res.status == 0, res.stderr
    rows = read_rows(out)
    assert Counter(r["id"] for r in rows) == Counter(f"t{i:02d}.wav" for i in range(12))
    assert len({r["run"] for r in rows}) == 1  # one run: the shard is not part of the run key
    per_shard = Counter(shard_of(r["id"], 3) for r in rows)
    assert len(per_shard) == 3
    calls = len(fake.requests)
    # Each shard resumes on its own, and a later unsharded run finds everything done.
    assert run_cli(["caption", audio, "--out", out, *FAKE_ARGS, "--shard", "1/3"]).status == 0
    assert run_cli(["caption", audio, "--out", out, *FAKE_ARGS]).status == 0
    assert len(fake.requests) == calls
    assert len(read_rows(out)) == 12


def test_dry_run_plans_only_the_shard(tmp_path: Path) -> None:
    import json

    audio = _corpus(tmp_path)
    base = ["caption", audio, "--out", tmp_path / "o", "--dry-run", "--json"]
    docs = [json.loads(run_cli([*base, "--shard", f"{i}/2"]).stdout) for i in range(2)]
    assert sum(d["files"] for d in docs) == 12 and all(d["files"] < 12 for d in docs)


def test_bad_shard_is_a_usage_error(tmp_path: Path) -> None:
    res = run_cli(["caption", _corpus(tmp_path, 1), "--out", tmp_path / "o", "--shard", "2/2"])
    assert res.status == 2 and "--shard" in res.stderr


def _sink(out: Path, shard: tuple[int, int] | None) -> Sink:
    return Sink(out, "abcdef123456", {}, model="m", task="t", shard=shard)


def test_shard_locks(tmp_path: Path) -> None:
    """flock conflicts between open file descriptions, so one process can play several writers."""
    s0 = _sink(tmp_path, (0, 2))
    try:
        s1 = _sink(tmp_path, (1, 2))  # another shard of the same run: side by side
        with pytest.raises(LockedError, match="shard 0/2"):
            _sink(tmp_path, (0, 2))  # the same shard twice
        with pytest.raises(LockedError, match="this run"):
            _sink(tmp_path, None)  # the whole run while shards write
        s1.close()
    finally:
        s0.close()
    whole = _sink(tmp_path, None)
    try:
        with pytest.raises(LockedError):
            _sink(tmp_path, (1, 2))  # a shard while the whole run writes
    finally:
        whole.close()


def test_a_shard_cleans_only_its_own_temp_parts(tmp_path: Path) -> None:
    tmp = tmp_path / "run=abcdef123456" / ".tmp"
    for name in ("shard-0-of-2", "shard-1-of-2"):
        (tmp / name).mkdir(parents=True)
        (tmp / name / "part-000001-aa.parquet.tmp").write_bytes(b"half")
    (tmp / "part-000002-bb.parquet.tmp").write_bytes(b"half")
    _sink(tmp_path, (0, 2)).close()
    assert not list((tmp / "shard-0-of-2").iterdir())
    assert list((tmp / "shard-1-of-2").iterdir())  # shard 1 may still be writing it
    assert (tmp / "part-000002-bb.parquet.tmp").exists()
    _sink(tmp_path, None).close()  # the whole run holds everything: it clears all leftovers
    assert not [p for p in tmp.rglob("*") if p.is_file()]
