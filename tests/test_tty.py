"""What an operator sees: the live display on a real terminal (tmux), plain lines off one.

Both run the real vLLM engine with the tiny random-weight AF3 checkpoint: run them under the shared
lock, ``flock /tmp/flamingo-engine.lock .venv/bin/pytest -m engine tests/test_tty.py``. The tmux test
needs tmux (``apt-get install -y tmux``) and skips without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_audio, read_rows, run_cli

pytestmark = pytest.mark.engine

N_FILES = 16
VLLM_NOISE = re.compile(r"Loading safetensors|Worker pid|WARNING|^\[?[WI]\d{4} |utils\.cpp|it/s\]", re.M)
CHUNKS = re.compile(r"chunks\s+(\d+)/(\d+|…) done")


def _tmux(socket: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tty-audio")
    for i in range(N_FILES):
        make_audio(root / f"clip{i:02d}.wav", 25.0 + i, seed=i)
    return root


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_live_display_in_a_real_terminal(tiny_af3, audio, tmp_path):
    flamingo = Path(sys.executable).with_name("flamingo")
    out, summary, log = tmp_path / "out", tmp_path / "summary.json", tmp_path / "run.log"
    command = (
        f"{flamingo} caption {audio} --out {out} --model {tiny_af3} --temperature 0 --max-tokens 8 "
        # one at a time, so chunks finish in steps a person can watch: all 16 would finish in one engine
        # step, and four at a time did on a faster CPU within 2 s, the panel showing 0 and then 16 done
        f"--max-num-seqs 1 --summary-json {summary} --log-file {log} --log-interval 1; echo FLAMINGO_EXIT=$?; sleep 600"
    )
    socket = f"flamingo-test-{os.getpid()}"
    env_cmd = f"env VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE', '2')} bash -c {command!r}"
    started = _tmux(socket, "new-session", "-d", "-s", "run", "-x", "130", "-y", "60", env_cmd)
    assert started.returncode == 0, started.stderr
    screens: list[str] = []
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            shot = _tmux(socket, "capture-pane", "-p", "-t", "run").stdout
            if not screens or shot != screens[-1]:
                screens.append(shot)
            if "FLAMINGO_EXIT=" in shot:
                break
            time.sleep(0.2)
    finally:
        _tmux(socket, "kill-server")
    (tmp_path / "screens.txt").write_text("\n=====\n".join(screens))  # kept for a look on failure
    final = screens[-1]
    assert "FLAMINGO_EXIT=0" in final, final

    # While the model loads: a spinner line says so.
    assert any("starting the vLLM engine" in s for s in screens)
    # While captioning: the panel with the counts moving, the speed and an ETA.
    panels = [s for s in screens if CHUNKS.search(s) and "real time" in s]
    done_counts = {int(CHUNKS.search(s).group(1)) for s in panels}
    assert len(done_counts) >= 3, f"counts did not move: {sorted(done_counts)}"
    assert any(0 < n < N_FILES for n in done_counts)
    assert any(re.search(r"ETA \d+:\d\d:\d\d", s) for s in panels)
    assert any(f"/{N_FILES} done" in s for s in panels)  # the files total, once known
    # At the end: the final panel, then the summary table.
    assert f"{N_FILES}/{N_FILES} done" in final
    assert re.search(r"flamingo run \w+: ok", final) and "files ok" in final and "wall time" in final
    # vLLM's own bars and warnings never reach the terminal without --verbose.
    noisy = [m.group(0) for s in screens for m in [VLLM_NOISE.search(s)] if m]
    assert not noisy, noisy

    doc = json.loads(summary.read_text())
    assert (doc["status"], doc["files_ok"], doc["chunks_ok"], doc["files_failed"]) == ("ok", N_FILES, N_FILES, 0)
    assert doc["engine_start_s"] > 0 and doc["x_realtime"] > 0 and doc["rows_written"] == N_FILES
    logged = log.read_text()
    assert " start " in logged and " engine_ready " in logged and "done status=ok" in logged
    assert "\r" not in logged
    assert len(read_rows(out)) == N_FILES


def test_plain_output_off_a_terminal(tiny_af3, audio, tmp_path):
    """Pipes and cron: no carriage returns, no colour, a line per interval and a summary line."""
    out, summary = tmp_path / "out", tmp_path / "s.json"
    files = sorted(audio.iterdir())[:6]
    args = ["caption", *files, "--out", out, "--model", tiny_af3, "--temperature", "0", "--max-tokens", "8"]
    res = run_cli([*args, "--log-interval", "0.05", "--summary-json", summary])
    assert res.status == 0, res.stderr
    err = res.stderr
    assert "\r" not in err and "\x1b[" not in err
    lines = err.splitlines()
    assert any(ln.startswith("starting the vLLM engine for ") for ln in lines)
    progress = [ln for ln in lines if ln.startswith("[flamingo ")]
    assert progress, err
    assert all(re.search(r"files=\d+/(\d+|…) .* chunks=\d+/(\d+|…) .* eta=", ln) for ln in progress)
    assert lines[-1].startswith("done: status=ok files_ok=6 files_failed=0")
    assert json.loads(summary.read_text())["files_ok"] == 6

    # --quiet: nothing at all on stderr for a successful run
    quiet = run_cli([*args, "--quiet", "--out", tmp_path / "out2"])
    assert quiet.status == 0 and quiet.stderr == ""
