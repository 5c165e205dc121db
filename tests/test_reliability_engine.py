"""Never lose a night's run (issue #5) with the real vLLM engine on CPU and a tiny random-weight AF3.

One corpus goes through three ``python -m flamingo_cli caption`` subprocesses, each stopped differently
(SIGTERM to the process group, SIGKILL, vLLM's engine process killed), then one in-process run
finishes it; after every step the output must read and hold each (id, chunk) at most once. Each
subprocess pays an engine start (~1 min on CPU); the in-process runs share conftest's cached engine.
Run under the shared lock: ``flock /tmp/flamingo-engine.lock .venv/bin/pytest -m engine ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest
from conftest import ENGINE_ARGS, make_audio, read_rows, run_cli
from test_reliability import bad_corpus, check_bad_corpus, current, visible_parts_readable  # noqa: F401

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
# 1-7 s files -> 1-4 chunks: kills land inside items too. No track rows (tracks.py): this test is about
# the chunk rows (tests/test_tracks.py kills between the chunks and the track row).
CHUNK_ARGS = ["--chunk-seconds", "2", "--no-track-summary"]


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    # ~2,100 chunks: more than 4x the engine's 512 requests in flight, so each stopped run below stops
    # mid-corpus however fast the machine (the engine keeps working while the first part is written).
    root = tmp_path_factory.mktemp("kill-corpus")
    chunks = {}
    for i in range(900):
        seconds = 1.0 + i % 7
        make_audio(root / f"f{i:03d}.wav", seconds, 16000, seed=i)
        chunks[f"f{i:03d}.wav"] = -(-int(seconds) // 2)
    return root, chunks


def _keys(out: Path) -> Counter:
    dataset = ds.dataset(out, partitioning="hive", format="parquet") if out.exists() else None
    if dataset is None or not dataset.files:  # nothing written yet
        return Counter()
    t = dataset.to_table(columns=["id", "chunk_index"])
    return Counter(zip(t["id"].to_pylist(), t["chunk_index"].to_pylist(), strict=True))


def _check_output(out: Path) -> int:
    """Readable by pyarrow.dataset, every visible part whole, no key twice; returns the row count."""
    n = visible_parts_readable(out)
    dupes = [k for k, c in _keys(out).items() if c > 1]
    assert not dupes, dupes[:5]
    return n


def _parts(out: Path) -> int:
    return len(list(out.glob("run=*/part-*.parquet")))


def _start(corpus: Path, out: Path, log: Path, rows_per_part: int = 1) -> subprocess.Popen:
    """A caption subprocess in its own session (so it can be signalled as a process group).

    --max-num-seqs 2 keeps the tiny model from finishing the whole corpus in its first batch, so the
    stops land mid-run; it changes neither the run key nor the output. Not --quiet: the log shows the
    stop messages.
    """
    cmd = [sys.executable, "-m", "flamingo_cli", "caption", str(corpus), "--out", str(out), "--model"]
    cmd += [os.environ["FLAMINGO_TEST_CKPT"], *[a for a in ENGINE_ARGS if a != "--quiet"], *CHUNK_ARGS]
    cmd += ["--rows-per-part", str(rows_per_part), "--max-num-seqs", "2"]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def _wait_for_new_part(proc: subprocess.Popen, out: Path, before: int, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while _parts(out) <= before:
        assert proc.poll() is None, f"exited with {proc.returncode} before writing"
        assert time.monotonic() - t0 < timeout, "no part written in time"
        time.sleep(0.05)


def _descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:  # never leave a 3 GB engine behind, even when the test fails
        with contextlib.suppress(psutil.Error):
            p.kill()
    return alive


@pytest.mark.serial
def test_kill_resume_and_signals_exactly_once(kill_corpus, tiny_af3, tmp_path, monkeypatch) -> None:
    corpus, n_chunks = kill_corpus
    total = sum(n_chunks.values())
    out = tmp_path / "out"
    monkeypatch.setenv("FLAMINGO_TEST_CKPT", str(tiny_af3))
    rng = random.Random(5)
    log = []

    # 1. SIGTERM to the whole process group (systemd stop; Ctrl-C does the same with SIGINT), so vLLM's
    # engine process gets it too: exit 143, finished rows flushed, nothing half written.
    proc = _start(corpus, out, tmp_path / "term.log", rows_per_part=4)
    try:
        _wait_for_new_part(proc, out, 0)
        time.sleep(rng.uniform(0.0, 0.5))
        rows_at_signal = _check_output(out)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=120)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "term.log").read_text()
    assert status == 143, text[-2000:]
    assert "stopping" in text
    rows = _check_output(out)
    assert rows_at_signal <= rows < total  # stopped mid-run, finished rows written
    assert not [p for p in out.glob("run=*/.tmp/*")]
    log.append(f"SIGTERM after {rows_at_signal} rows: exit 143 in {stop_s:.1f} s, {rows} rows")

    # 2. SIGKILL of the flamingo process at a random moment after it starts writing.
    before = _parts(out)
    proc = _start(corpus, out, tmp_path / "kill.log")
    try:
        _wait_for_new_part(proc, out, before)
        time.sleep(rng.uniform(0.0, 0.5))
        kids = _descendants(proc)
        assert any(k.name() == "VLLM::EngineCore" for k in kids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # vLLM's processes do not outlive flamingo (the reaper stops them).
    assert not _gone(kids, timeout=30), "vLLM processes outlived a SIGKILLed flamingo"
    rows = _check_output(out)
    assert rows < total
    log.append(f"SIGKILL: {rows} rows")

    # 3. vLLM's engine process dies mid-run: exit 3 (not a hang), finished rows kept.
    before = _parts(out)
    proc = _start(corpus, out, tmp_path / "engine.log")
    try:
        _wait_for_new_part(proc, out, before)
        time.sleep(rng.uniform(0.0, 0.5))
        (core,) = [k for k in _descendants(proc) if k.name() == "VLLM::EngineCore"]
        core.kill()
        t0 = time.monotonic()
        assert proc.wait(timeout=120) == 3
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "engine.log").read_text()
    assert "EngineDeadError" in text and "run the same command to resume" in text, text[-2000:]
    rows = _check_output(out)
    assert rows < total
    log.append(f"engine process killed: exit 3 in {exit_s:.1f} s, {rows} rows")

    # 4. The same command again (in-process, the cached engine) finishes: every key exactly once.
    res = run_cli(["caption", corpus, "--out", out, "--model", tiny_af3, *ENGINE_ARGS, *CHUNK_ARGS])
    assert res.status == 0, res.stderr
    keys = _keys(out)
    assert set(keys.values()) == {1}
    assert set(keys) == {(i, c) for i, n in n_chunks.items() for c in range(n)}
    assert all(r["error"] is None and isinstance(r["caption"], str) for r in read_rows(out))
    print("\n" + "; ".join(log))


def test_bad_corpus_one_caption_call(bad_corpus, tiny_af3, tmp_path) -> None:  # noqa: F811
    """Every kind of bad input through one real caption call: a row each, the right reason, the rest captioned.

    Then --retry-failed reruns only the error rows, and another prompt starts a separate run.
    """
    out = tmp_path / "out"
    args = ["caption", *bad_corpus["inputs"], "--out", out, "--model", tiny_af3, *ENGINE_ARGS]
    res = run_cli(args)
    assert res.status == 1, res.stderr
    rows = read_rows(out)
    check_bad_corpus(rows, bad_corpus, real_engine=True)
    print("\nm-huge:", {r["id"]: r for r in rows}["m-huge"]["error"][:300])
    errors = {(r["id"], r["chunk_index"]) for r in rows if r["error"]}

    res = run_cli([*args, "--retry-failed"])
    assert res.status == 1, res.stderr
    counts = Counter((r["id"], r["chunk_index"]) for r in read_rows(out))
    assert {k for k, c in counts.items() if c == 2} == errors  # each error row once more, nothing else
    assert set(counts.values()) == {1, 2}
    assert len(current(out)) == len(rows)

    res = run_cli([*args, "--prompt", "List the instruments."])
    assert res.status == 1
    assert len(list(out.glob("run=*"))) == 2


def test_model_that_is_not_a_checkpoint(tmp_path, tiny_af3) -> None:
    make_audio(tmp_path / "a.wav", 1.0)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    res = run_cli(["caption", tmp_path / "a.wav", "--out", tmp_path / "o", "--model", empty, *ENGINE_ARGS])
    assert res.status == 2 and "no config.json" in res.stderr and str(empty) in res.stderr  # before any loading

    # A config.json alone: flamingo cannot read the audio front-end's facts, a usage error naming them.
    bare = tmp_path / "bare-ckpt"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_af3 / "config.json").read_text())
    res = run_cli(["caption", tmp_path / "a.wav", "--out", tmp_path / "o", "--model", bare, *ENGINE_ARGS])
    assert res.status == 2 and str(bare) in res.stderr and "preprocessor_config.json" in res.stderr

    # Every file flamingo reads is there, but vLLM cannot load the model: exit 3, nothing written.
    broken = tmp_path / "broken-ckpt"
    broken.mkdir()
    for f in tiny_af3.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_af3 / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "not-a-model-type"}))
    res = run_cli(["caption", tmp_path / "a.wav", "--out", tmp_path / "o", "--model", broken, *ENGINE_ARGS])
    assert res.status == 3, res.stderr
    assert "vLLM could not load" in res.stderr and str(broken) in res.stderr
    assert not list((tmp_path / "o").glob("run=*/part-*"))
