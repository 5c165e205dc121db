"""Cron-grade behaviour (issue 16's core): every mistake exits 2 at once with one line, idle nights
cost no engine, the summary JSON exists after every exit, a stop drops what has not started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_audio, read_rows, run_cli
from test_reliability import FAKE_ARGS, FakeEngine

from flamingo_cli.engine import END, EngineError
from flamingo_cli.env import ExitStatus

REPO = Path(__file__).resolve().parent.parent

# The invocations a cron user typed wrong (issue 16), each a usage error: exit 2, one line, no traceback.
BAD = [
    [],  # a bare `flamingo`
    ["caption", "{audio}", "--out", "{out}", "--max-token", "16"],  # unknown flag
    ["caption", "{audio}", "--out", "{out}", "--temperature", "abc"],  # not a number
    ["caption", "{audio}"],  # no --out
    ["captoin", "{audio}", "--out", "{out}"],  # misspelled command
    ["caption", "{audio}", "--out", "{out}", "--max-tokens", "0"],
    ["caption", "{audio}", "--out", "{out}", "--temperature", "-1"],
    ["caption", "{audio}", "--out", "{out}", "--top-p", "0"],
    ["caption", "{audio}", "--out", "{out}", "--ext", "a/b"],
    ["caption", "{audio}", "--out", "{out}", "--ray-replicas", "0"],
]


def _fill(args: list[str], audio: Path, out: Path) -> list[str]:
    return [a.format(audio=audio, out=out) for a in args]


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    folder = tmp_path / "audio"
    for i in range(3):
        make_audio(folder / f"f{i}.wav", 0.5, seed=i)
    return folder


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a)[:40] or "bare")
def test_bad_invocations_exit_2_with_one_line_in_process(args, audio, tmp_path, use_engine) -> None:
    engine = use_engine(FakeEngine())
    t0 = time.monotonic()
    res = run_cli(_fill(args, audio, tmp_path / "out"))
    seconds = time.monotonic() - t0
    assert res.status == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not engine.requests and not (tmp_path / "out").exists()
    assert seconds < 3, seconds  # the bound: nothing heavy happens before the check


def test_bad_invocations_exit_2_as_a_subprocess(audio, tmp_path) -> None:
    """The console entry point too (no in-process shortcut): exit 2, no traceback, for every mistake."""
    for args in BAD:
        proc = subprocess.run(
            [sys.executable, "-m", "flamingo_cli", *_fill(args, audio, tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_a_bad_preset_value_is_a_usage_error_naming_the_preset(audio, tmp_path) -> None:
    preset = tmp_path / "hot.toml"
    preset.write_text('[task]\nmodel = "af3"\nprompt = "Describe."\n[sampling]\ntemperature = -2.0\n')
    res = run_cli(["caption", audio, "--out", tmp_path / "out", "--task", preset])
    assert res.status == 2 and "hot.toml" in res.stderr and "--temperature" in res.stderr


def test_an_idle_night_exits_0_without_an_engine(audio, tmp_path, use_engine, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, summary = tmp_path / "out", tmp_path / "s.json"
    engine = use_engine(FakeEngine())
    assert run_cli(["caption", audio, "--out", out, *FAKE_ARGS]).status == 0
    assert len(engine.requests) == 3
    use_engine(None)  # the next run has no engine to borrow: starting vLLM for af3 offline would fail (3)
    t0 = time.monotonic()
    res = run_cli(["caption", audio, "--out", out, *FAKE_ARGS, "--summary-json", summary])
    assert res.status == 0, res.stderr
    doc = json.loads(summary.read_text())
    assert doc["status"] == "ok" and doc["reason"] == "nothing to do" and doc["engine_start_s"] is None
    assert doc["rows_written"] == 0 and len(read_rows(out)) == 3
    assert (doc["files_seen"], doc["files_skipped"]) == (3, 3)  # counted by the plan, no run needed
    assert time.monotonic() - t0 < 30


def test_only_error_rows_left_need_no_engine(tmp_path, use_engine, monkeypatch) -> None:
    """A manifest whose new rows name missing files: their error rows are written, no model loads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{tmp_path / 'gone.wav'}\n")
    res = run_cli(["caption", manifest, "--out", tmp_path / "out", *FAKE_ARGS])
    assert res.status == 1, res.stderr
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 1 and "gone.wav" in rows[0]["error"]


class _Dies(FakeEngine):
    def run(self, feed, sampling, on_step=None):
        for i, result in enumerate(super().run(feed, sampling, on_step)):
            if i == 1:
                raise EngineError("the vLLM engine failed: EngineDeadError")
            yield result


class _Interrupts(FakeEngine):
    def run(self, feed, sampling, on_step=None):
        for i, result in enumerate(super().run(feed, sampling, on_step)):
            yield result
            if i == 0:
                os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C: the handler stops the feed


def test_summary_json_after_every_exit(audio, tmp_path, use_engine, monkeypatch) -> None:
    """exit 2 (bad option), 3 (engine died), 4 (disk full), 5 (locked), 130 (Ctrl-C): the summary is there."""
    import flamingo_cli.output.writers as writers_mod
    import flamingo_cli.prompts
    from flamingo_cli.sink import Sink

    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(name: str, engine: Any, *extra: Any) -> dict[str, Any]:
        use_engine(engine)
        summary, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
        out = tmp_path / f"out-{name}"
        res = run_cli(
            ["caption", audio, "--out", out, *FAKE_ARGS, "--summary-json", summary, "--log-file", log, *extra]
        )
        doc = json.loads(summary.read_text())
        assert doc["exit_code"] == res.status, (res.stderr, doc)
        assert f"status={doc['status']}" in log.read_text()
        return doc

    assert run("usage", FakeEngine(), "--max-tokens", "0")["status"] == "usage_error"
    doc = run("engine", _Dies())
    assert doc["status"] == "engine_error" and "EngineDeadError" in doc["reason"]

    def disk_full(*_a: Any, **_k: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(writers_mod.pq, "write_table", disk_full)
        assert run("disk", FakeEngine())["status"] == "output_error"

    from flamingo_cli.spec import CaptionSpec

    spec = CaptionSpec.build([audio], tmp_path / "out-locked", model="af3", temperature=0, max_tokens=8)
    with Sink(tmp_path / "out-locked", spec.run_key, {}, model=spec.model, task=spec.task):
        assert run("locked", FakeEngine())["status"] == "locked"
    doc = run("interrupted", _Interrupts())
    assert doc["status"] == "interrupted" and doc["exit_code"] == ExitStatus.INTERRUPTED


class _FakeVllm:
    """vLLM's engine as VllmEngine drives it: runs ``slots`` requests at a time, one token a step."""

    def __init__(self, slots: int, steps: int) -> None:
        self.slots, self.steps = slots, steps
        self.queue: list[str] = []
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        self.queue.append(rid)

    def abort_request(self, rids: list[str]) -> None:
        self.aborted.extend(rids)
        self.queue = [r for r in self.queue if r not in rids]
        for r in rids:
            self.running.pop(r, None)

    def step(self) -> list[Any]:
        from types import SimpleNamespace

        while self.queue and len(self.running) < self.slots:
            self.running[self.queue.pop(0)] = 0
        outs = []
        for rid in list(self.running):
            self.running[rid] += 1
            done = self.running[rid] >= self.steps
            if done:
                del self.running[rid]
            completion = SimpleNamespace(text="x", token_ids=[1], finish_reason="length" if done else None)
            outs.append(SimpleNamespace(request_id=rid, outputs=[completion], finished=done, prompt_token_ids=[0]))
        return outs


def _bare_vllm_engine(fake: _FakeVllm):
    """A VllmEngine around ``fake`` (vLLM's add_request/step/abort_request), no vLLM started."""
    from flamingo_cli.engine import EngineConfig, VllmEngine
    from flamingo_cli.models import AF3

    engine = object.__new__(VllmEngine)
    engine.config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0)
    engine._engine, engine._counter, engine._pending, engine._started, engine._drop = fake, 0, {}, set(), False
    engine.llm = object()  # alive() looks through it for vLLM's engine_dead flag
    engine._decode = lambda ids, skip_special_tokens: "x" * len(ids)  # the tokenizer's decode
    return engine


def _feed(n: int):
    """n one-second chunks f0..f{n-1}, then END."""
    import queue

    import numpy as np

    from flamingo_cli.records import AudioItem, Chunk, Request

    feed: queue.Queue = queue.Queue()
    for i in range(n):
        item = AudioItem(id=f"f{i}", path=f"/x/f{i}.wav")
        chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0, end_s=1, samples=np.zeros(16000), duration_s=1)
        feed.put(Request(chunk=chunk, prompt="p", text="t"))
    feed.put(END)
    return feed


def test_a_stop_drops_waiting_requests_and_finishes_running_ones(monkeypatch) -> None:
    """SIGTERM with 40 chunks queued in vLLM and 4 running: the 4 finish, the 36 come back aborted."""

    from flamingo_cli.engine import VllmEngine
    from flamingo_cli.records import Request, Sampling

    fake = _FakeVllm(slots=4, steps=5)
    engine = _bare_vllm_engine(fake)
    monkeypatch.setattr(VllmEngine, "_add", lambda self, request, sampling: _add(self, request))

    def _add(self: VllmEngine, request: Request) -> str:
        self._counter += 1
        rid = f"r{self._counter}"
        fake.add_request(rid, None, None)
        return rid

    feed = _feed(40)
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 2:  # the stop arrives while 4 requests run and 36 wait inside the engine
            engine.drop_waiting()

    results = list(engine.run(feed, Sampling(max_tokens=5), on_step=on_step))
    finished = [r for r in results if r.finish_reason == "length"]
    aborted = [r for r in results if r.finish_reason == "abort"]
    assert len(finished) == 4 and len(aborted) == 36 and len(fake.aborted) == 36
    assert all(r.caption == "xxxxx" and r.output_tokens == 5 for r in finished)  # deltas joined
    assert {r.chunk.item.id for r in finished} == {"f0", "f1", "f2", "f3"}


def test_a_dead_engine_ends_the_run_instead_of_failing_every_chunk_left(monkeypatch) -> None:
    """vLLM's engine process died: ``add_request`` raises EngineDeadError for every chunk still to come.

    The run ends with EngineError (exit 3, resume redoes the rest); a request the engine refuses on its
    own merits (a prompt too long) stays one error row and the run goes on.
    """

    from flamingo_cli.engine import VllmEngine
    from flamingo_cli.records import Request, Sampling

    class EngineDeadError(Exception):  # vLLM's class, by name: what the engine checks
        pass

    fake = _FakeVllm(slots=4, steps=2)
    engine = _bare_vllm_engine(fake)
    added: list[str] = []

    def _add(self: VllmEngine, request: Request, sampling: Sampling) -> str:
        n = int(request.chunk.item.id[1:])
        if n == 1:
            raise ValueError("prompt is longer than the maximum model length")
        if n >= 5:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        self._counter += 1
        fake.add_request(f"r{self._counter}", None, None)
        added.append(request.chunk.item.id)
        return f"r{self._counter}"

    monkeypatch.setattr(VllmEngine, "_add", _add)
    feed = _feed(40)
    results = []
    with pytest.raises(EngineError, match="EngineDeadError"):
        for result in engine.run(feed, Sampling(max_tokens=2)):
            results.append(result)
    assert added == ["f0", "f2", "f3", "f4"]
    assert [(r.chunk.item.id, r.error) for r in results] == [
        ("f1", "rejected by the engine: prompt is longer than the maximum model length")
    ]  # one row for the refused request; none for the 35 chunks behind the dead engine


@pytest.mark.parametrize(
    ("n", "refused", "expect"),
    [
        (100, set(range(100)), "fails"),  # one cause refuses everything: exit 3, no row for any of them
        (5, set(range(5)), "rows"),  # a corpus smaller than the limit: its rejections are its rows
        (100, set(range(70)) - {3}, "rows"),  # the engine took one early: rejections are per-request
    ],
    ids=["systematic", "small-corpus", "accepted-one"],
)
def test_an_engine_refusing_every_request_fails_the_run(monkeypatch, n, refused, expect) -> None:

    from flamingo_cli.engine import REJECTED_BEFORE_ANY, VllmEngine
    from flamingo_cli.records import Request, Sampling

    assert REJECTED_BEFORE_ANY < 100
    fake = _FakeVllm(slots=8, steps=1)
    engine = _bare_vllm_engine(fake)

    def _add(self: VllmEngine, request: Request, sampling: Sampling) -> str:
        if int(request.chunk.item.id[1:]) in refused:
            raise ValueError("structured outputs: this backend cannot serve the request")
        self._counter += 1
        fake.add_request(f"r{self._counter}", None, None)
        return f"r{self._counter}"

    monkeypatch.setattr(VllmEngine, "_add", _add)
    feed = _feed(n)
    results: list = []
    if expect == "fails":
        with pytest.raises(EngineError, match=f"rejected the first {REJECTED_BEFORE_ANY} requests.*cannot serve"):
            results.extend(engine.run(feed, Sampling(max_tokens=1)))
        assert results == []
        return
    results.extend(engine.run(feed, Sampling(max_tokens=1)))
    assert len(results) == n
    errors = {r.chunk.item.id for r in results if r.error}
    assert errors == {f"f{i}" for i in refused}
    assert all(
        r.error == "rejected by the engine: structured outputs: this backend cannot serve the request"
        for r in results
        if r.error
    )
