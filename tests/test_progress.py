"""Progress without an engine: plain log lines, totals, ETA, the live panel's content, the summary files
(a run's ``lifecycle.Monitor``: its counts, display and summary), and the fd redirection that keeps
vLLM's worker output off the terminal."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_audio
from rich.console import Console

from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.lifecycle import InputWalk, Monitor
from flamingo_cli.pipeline import Stats
from flamingo_cli.progress import Progress
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sources import iter_items
from flamingo_cli.summary import hms, write_json_atomic
from flamingo_cli.tally import Watched


class ListSink:
    def __init__(self) -> None:
        self.rows: list[Result] = []
        self.rows_written = 0
        self.buffered = 0
        self.parts_written = 0
        self.begun: list[tuple] = []

    def write(self, result: Result) -> None:
        self.rows.append(result)
        self.rows_written += 1

    def begin_item(self, item_id, source, version, rows) -> None:
        self.begun.append((item_id, rows))


def result(item_id: str, index: int, num_chunks: int, seconds: float = 30.0, error: str | None = None) -> Result:
    item = AudioItem(id=item_id, path=f"/data/{item_id}")
    start = index * seconds
    chunk = Chunk(item, index, num_chunks, start, start + seconds, None, num_chunks * seconds)
    return Result(chunk=chunk, prompt="p", caption=None if error else "c", error=error)


def plain_env() -> tuple[Environment, io.StringIO]:
    err = io.StringIO()
    return Environment(stdout=io.StringIO(), stderr=err, stdout_isatty=False, stderr_isatty=False), err


def screen(progress: Progress) -> str:
    console = Console(file=io.StringIO(), width=110, record=True, force_terminal=False)
    console.print(progress.renderable())
    return console.export_text()


def test_watched_sink_counts_finished_items_and_delegates():
    inner = ListSink()
    w = Watched(inner)
    w.begin_item("a", None, 0, 2)  # the pipeline's announcement reaches the real sink too
    assert inner.begun == [("a", 2)]
    w.write(result("a", 0, 2))
    assert w.items_finished == 0
    w.write(result("a", 1, 2))
    assert (w.items_ok, w.items_with_errors) == (1, 0)
    # b: one chunk fails -> finished, with errors
    w.write(result("b", 0, 2, error="rejected by the engine: x"))
    w.write(result("b", 1, 2))
    assert (w.items_ok, w.items_with_errors) == (1, 1)
    # c: resumed, one of its 3 chunks left -> finished after one row
    w.begin_item("c", None, 0, 1)
    w.write(result("c", 2, 3))
    assert w.items_ok == 2
    # an item that failed before chunking (num_chunks 0) is Stats' business, not counted here
    bad = result("d", 0, 0, error="empty file")
    w.write(bad)
    assert w.items_finished == 3
    assert len(inner.rows) == 6 and w.rows_written == 6  # attributes pass through


def wait_for(stream: io.StringIO, pattern: str, timeout: float = 10.0) -> str:
    """The first plain progress line matching ``pattern`` (the line thread writes every interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stream.getvalue().splitlines():
            if line.startswith("[flamingo ") and re.search(pattern, line):
                return line
        time.sleep(0.01)
    raise AssertionError(f"no line matching {pattern!r} in:\n{stream.getvalue()}")


def test_plain_lines_totals_eta_and_summary_files(tmp_path):
    audio = tmp_path / "audio"
    for i in range(3):
        make_audio(audio / f"a{i}.wav", 1.0, seed=i)
    env, err = plain_env()
    log = tmp_path / "logs" / "run.log"
    summary = tmp_path / "mon" / "summary.json"
    stats = Stats()
    m = Monitor(
        env,
        model="tiny",
        task="caption",
        interval=0.05,
        log_file=log,
        summary_json=summary,
        out=tmp_path / "out",
        run_key="abc123",
    )
    m.start(stats, walk=InputWalk(iter_items([str(audio)])).start())
    sink = m.tally.watch(ListSink())
    # Lines come by themselves (nobody calls tick()); the walk, once it has read every input, gives the
    # files total before the chunk and audio totals are known.
    wait_for(err, r"files=0/3 .*chunks=0/… .*audio_h=0.000/… .*eta=…")

    with stats.lock:
        stats.items_seen = 3
        stats.chunks_queued = 3
        stats.audio_s_queued = 90.0
        stats.started -= 10  # ten seconds in
    sink.write(result("a0.wav", 0, 1))
    with stats.lock:
        stats.chunks_done, stats.audio_s_done, stats.windows_done = 1, 30.0, 1
        stats.sources_exhausted = True
    snap = m.tally.snapshot()
    assert (snap["files_done"], snap["files_total"]) == (1, 3)
    assert (snap["chunks_done"], snap["chunks_total"]) == (1, 3)
    assert snap["eta_s"] == pytest.approx(20.0, abs=1.0)  # 60 s of audio left at 3 s/s
    assert snap["x_realtime"] == pytest.approx(3.0, rel=0.05)
    wait_for(err, r"files=1/3 .*chunks=1/3 .*audio_h=0.008/0.025 x_rt=\d.* eta=0:00:(19|2\d)")

    for name in ("a1.wav", "a2.wav"):
        sink.write(result(name, 0, 1))
    with stats.lock:
        stats.chunks_done, stats.audio_s_done, stats.windows_done = 3, 90.0, 3
    wait_for(err, r"files=3/3 .*chunks=3/3 .*eta=0:00:00")
    m.display.close()
    doc = m.finish(ExitStatus.OK)

    text = err.getvalue()
    lines = text.splitlines()
    assert lines[-1].startswith("done: status=ok files_ok=3 files_failed=0")
    assert "\r" not in text and "\x1b[" not in text  # no animation, no colour codes off a terminal
    n_lines = sum(ln.startswith("[flamingo ") for ln in lines)
    assert n_lines >= 3

    assert doc["status"] == "ok" and doc["files_ok"] == 3 and doc["chunks_ok"] == 3
    on_disk = json.loads(summary.read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["audio_hours"] == pytest.approx(90 / 3600) and on_disk["run_key"] == "abc123"
    assert not list(summary.parent.glob(".*tmp"))  # atomic write left nothing behind

    logged = log.read_text().splitlines()
    assert "[flamingo] start " in logged[0] and "model=tiny" in logged[0]
    assert sum("[flamingo] progress files=" in ln for ln in logged) >= 3
    assert "[flamingo] done status=ok" in logged[-1]


def test_quiet_prints_nothing_but_still_logs_and_writes_summary(tmp_path):
    env, err = plain_env()
    stats = Stats()
    log, summary = tmp_path / "l.log", tmp_path / "s.json"
    m = Monitor(env, model="m", quiet=True, interval=0.05, log_file=log, summary_json=summary)
    m.start(stats)
    time.sleep(0.2)
    m.display.close()
    m.finish(ExitStatus.ITEMS_FAILED)
    assert err.getvalue() == ""
    assert "progress" in (tmp_path / "l.log").read_text()
    assert json.loads((tmp_path / "s.json").read_text())["status"] == "items_failed"


def test_live_panel_shows_what_a_person_needs():
    env, _ = plain_env()
    stats = Stats()
    m = Monitor(env, model="nvidia/audio-flamingo-3-hf", task="caption", run_key="k1")
    m.start(stats)
    m.tally.watch(ListSink())
    before = screen(m.display)
    for label in ("files", "chunks", "audio", "speed", "ETA", "errors", "nvidia/audio-flamingo-3-hf"):
        assert label in before
    assert "0/… done" in before and "ETA …" in before  # totals unknown until the inputs are exhausted

    with stats.lock:
        stats.items_seen, stats.items_skipped, stats.items_failed = 10, 2, 1
        stats.chunks_queued, stats.chunks_done, stats.chunks_failed = 8, 4, 1
        stats.audio_s_queued, stats.audio_s_done, stats.windows_done = 240.0, 120.0, 4
        stats.sources_exhausted = True
    stats.started -= 60
    after = screen(m.display)
    assert "3/10 done" in after and "2 already done" in after and "1 failed" in after
    assert "5/8 done" in after  # chunks: 4 ok + 1 failed of 8
    assert "0.033/0.067 h" in after
    assert "2.0× real time" in after
    assert "ETA 0:01:00" in after
    assert "50%" in after


def test_failed_engine_start_writes_the_summary(tmp_path):
    class Boom(Exception):
        status = ExitStatus.ENGINE

    env, err = plain_env()
    m = Monitor(env, model="m", summary_json=tmp_path / "s.json")
    with pytest.raises(Boom), m.recording(), m.display.engine_start():
        raise Boom("vLLM could not load m")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["status"] == "engine_error" and doc["exit_code"] == 3 and "could not load" in doc["error"]
    assert "starting the vLLM engine for m" in err.getvalue()


def test_close_during_an_exception_records_it(tmp_path):
    class Stop(Exception):
        status = ExitStatus.OUTPUT

    env, _ = plain_env()
    m = Monitor(env, model="m", summary_json=tmp_path / "s.json")
    m.start(Stats())
    with pytest.raises(Stop), m.recording():
        raise Stop("disk full")
    assert json.loads((tmp_path / "s.json").read_text())["status"] == "output_error"


def test_hms_and_atomic_json(tmp_path):
    assert hms(None) == "…" and hms(3725.4) == "1:02:05" and hms(-3) == "0:00:00"
    target = tmp_path / "a.json"
    write_json_atomic(target, {"x": 1})
    write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_redirect_fds_catches_child_processes_and_restores(tmp_path):
    """What vLLM's engine start gets: its worker processes write to the log file, not the terminal."""
    log = tmp_path / "vllm.log"
    code = f"""
import subprocess, sys
from pathlib import Path
from flamingo_cli.quiet import redirect_fds, log_tail
with redirect_fds(Path({str(log)!r})):
    print("parent stdout during start")
    print("parent stderr during start", file=sys.stderr)
    worker = "import sys, time; time.sleep(0.3); print('(Worker pid=1) Loading', file=sys.stderr)"
    subprocess.run([sys.executable, "-c", worker])
    late = "import sys, time; time.sleep(0.5); print('late worker line', file=sys.stderr)"
    child = subprocess.Popen([sys.executable, "-c", late])
print("after", file=sys.stderr)
child.wait()
print("tail:", log_tail(Path({str(log)!r}), 1))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "after\n"
    assert proc.stdout == "tail: late worker line\n"
    logged = log.read_text()
    for line in ("parent stdout during start", "parent stderr during start", "(Worker pid=1) Loading", "late worker"):
        assert line in logged


def test_log_tail_of_missing_file_is_empty(tmp_path):
    from flamingo_cli.quiet import log_tail

    assert log_tail(Path(tmp_path / "nope.log")) == ""


def test_decoder_chatter_goes_to_the_logger_and_the_rest_through(tmp_path):
    """libmpg123's fprintf(stderr) notes (seen on the H200 with soundfile-made MP3s) never reach the
    terminal raw: they go to the flamingo.decoder logger; every other byte on fd 2 passes in order, a
    child process's included, and fd 2 is back after stop()."""
    code = r"""
import logging, os, subprocess, sys
from flamingo_cli.quiet import DecoderChatter
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
log = logging.getLogger("flamingo.decoder"); log.addHandler(Keep()); log.setLevel(logging.INFO)
with DecoderChatter() as chatter:
    print("before", file=sys.stderr, flush=True)
    os.write(2, b"[src/libmpg123/layer3.c:INT123_do_layer3():1804] error: part2_3_length (3264) too large "
                b"for available bit count (3240)\n")
    os.write(2, b"Note: Illegal Audio-MPEG-Header 0x00000000 at offset 33654.\nNote: Trying to resync...\n")
    # a file that is not MPEG audio at all (seen on the dev machine with a text file named .mp3)
    os.write(2, b"Note: Hit end of (available) data during resync.\n")
    os.write(2, b"Warning: Xing stream size off by more than 1%, fuzzy seeking may be even more fuzzy "
                b"than by design!\n")
    os.write(2, b"Warning (not the decoder's): kept\n")
    os.write(2, b"[bracketed but not a decoder] kept\n")
    os.write(2, b"progress 50%\r")
    child = ("import os; os.write(2, b'[src/libmpg123/parse.c:do_readahead():1099] error: bad\\n'); "
             "os.write(2, b'child line\\n')")
    subprocess.run([sys.executable, "-c", child])
    print("after", file=sys.stderr, flush=True)
print("restored", file=sys.stderr, flush=True)
print(chatter.lines, len(seen), seen[0].split("]")[0], file=sys.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (
        b"before\nWarning (not the decoder's): kept\n[bracketed but not a decoder] kept\nprogress 50%\r"
        b"child line\nafter\nrestored\n"
    )
    assert proc.stdout.decode() == "6 6 [src/libmpg123/layer3.c:INT123_do_layer3():1804\n"


def test_a_terminal_behind_the_chatter_pipe_is_still_a_terminal() -> None:
    """The console script routes fd 2 through a pipe; the environment built inside it must still see
    the terminal behind it (the live display), and see a pipe as a pipe."""
    code = r"""
import os, pty, sys
from flamingo_cli.env import Environment
from flamingo_cli.quiet import DecoderChatter
_, tty = pty.openpty()
os.dup2(tty, 2)
sys.stderr = open(2, "w", closefd=False)
with DecoderChatter():
    inside = Environment().stderr_isatty
after = Environment().stderr_isatty
print(inside, after, os.isatty(2))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]
    plain = "from flamingo_cli.env import Environment\nfrom flamingo_cli.quiet import DecoderChatter\n"
    plain += "with DecoderChatter():\n    print(Environment().stderr_isatty)\n"
    proc = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
