"""One run from open to summary (lifecycle.py): the inputs are walked once per run, each directory
listed once and each file stat'ed once (the survey's fingerprint travels with the item to the executor
and the decoder), and the walk's read-ahead is bounded."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import make_audio, read_rows
from fakes import FakeEngine

from flamingo_cli.lifecycle import InputWalk
from flamingo_cli.records import AudioItem

FILES = ("a.wav", "sub1/b.wav", "sub1/deeper/c.flac", "sub2/d.wav")
# The os / os.path functions that stat for their caller (frozen modules on recent Pythons).
_OS_PATH = {f.__code__.co_filename for f in (os.path.exists, os.path.isfile, os.path.realpath, os.walk)}


class FsCounter:
    """Counts os.scandir/os.listdir calls per directory and flamingo's os.stat calls per path (a stat
    made for flamingo through os.path.exists/isfile counts too; one a library makes for itself, like
    soundfile's check before it opens a file, does not)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listed: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        real_scandir, real_listdir, real_stat = os.scandir, os.listdir, os.stat

        def scandir(path: Any = ".") -> Any:
            self._add(self.listed, path)
            return real_scandir(path)

        def listdir(path: Any = ".") -> Any:
            self._add(self.listed, path)
            return real_listdir(path)

        def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
            if self._from_flamingo():
                self._add(self.stats, path)
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "listdir", listdir)
        monkeypatch.setattr(os, "stat", stat)

    def _add(self, counter: Counter[str], path: Any) -> None:
        if isinstance(path, int):
            return
        key = os.path.abspath(os.fsdecode(os.fspath(path)))
        with self._lock:
            counter[key] += 1

    @staticmethod
    def _from_flamingo() -> bool:
        frame = sys._getframe(2)  # 0: this, 1: the stat wrapper
        while frame is not None and frame.f_code.co_filename in _OS_PATH:
            frame = frame.f_back
        return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("flamingo_cli")

    def reset(self) -> None:
        self.listed.clear()
        self.stats.clear()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for i, name in enumerate(FILES):
        make_audio(root / name, 1.0 + i, seed=i)
    return root


@pytest.mark.parametrize("content_hash", [False, True], ids=["stat", "hash"])
def test_one_walk_one_listing_per_folder_one_stat_per_file(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content_hash: bool
) -> None:
    import flamingo_cli.prompts

    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folders = {str(corpus), str(corpus / "sub1"), str(corpus / "sub1" / "deeper"), str(corpus / "sub2")}
    files = {str(corpus / name) for name in FILES}
    out = tmp_path / "out"
    engine = FakeEngine()
    fs = FsCounter(monkeypatch)

    def caption() -> Any:
        fs.reset()
        return flamingo_cli.caption(
            [str(corpus)], str(out), engine=engine, model="af3", temperature=0, max_tokens=8, quiet=True,
            content_hash=content_hash,
        )  # fmt: skip

    first = caption()
    assert first.status == 0 and first.rows_written == len(FILES) and len(engine.requests) == len(FILES)
    assert {k: v for k, v in fs.listed.items() if k in folders} == dict.fromkeys(folders, 1)
    assert {k: v for k, v in fs.stats.items() if k in files} == dict.fromkeys(files, 1), fs.stats

    second = caption()  # everything is in the output: the survey reads every file's fingerprint, once
    assert second.nothing_to_do and second.summary["files_skipped"] == len(FILES)
    assert len(engine.requests) == len(FILES) and len(read_rows(out)) == len(FILES)
    assert {k: v for k, v in fs.listed.items() if k in folders} == dict.fromkeys(folders, 1)
    assert {k: v for k, v in fs.stats.items() if k in files} == dict.fromkeys(files, 1), fs.stats


def test_the_walk_reads_ahead_a_bounded_amount_and_counts() -> None:
    items = [AudioItem(id=f"f{i}", path=f"/x/f{i}.wav") for i in range(1000)]
    walk = InputWalk(iter(items), max_items=10).start()
    time.sleep(0.2)
    assert walk.found <= 10 and walk.total is None  # blocked on the full buffer; the total is unknown
    assert list(walk) == items and walk.found == walk.total == 1000

    # Embedded audio bytes bound it too (one item always fits).
    blobs = [AudioItem(id=f"b{i}", path="", data=b"x" * 100) for i in range(50)]
    walk = InputWalk(iter(blobs), max_bytes=250).start()
    time.sleep(0.2)
    assert walk.found <= 2
    assert [b.id for b in walk] == [b.id for b in blobs]


def test_the_walk_raises_its_error_where_the_items_are_taken_and_stops_on_close() -> None:
    def broken() -> Any:
        yield AudioItem(id="a", path="/x/a.wav")
        raise OSError("listing failed")

    walk = InputWalk(broken()).start()
    assert next(walk).id == "a"
    with pytest.raises(OSError, match="listing failed"):
        next(walk)
    assert walk.total is None

    endless = (AudioItem(id=str(i), path="") for i in iter(int, 1))
    walk = InputWalk(endless, max_items=5).start()
    next(walk)
    walk.close()
    walk._thread.join(timeout=5)
    assert not walk._thread.is_alive() and walk.total is None
