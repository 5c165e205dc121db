"""Writers in other processes, for the tests that SIGKILL them: local folders and S3 alike.

``Zygote``: one process imports pyarrow and the sink once, then forks one writer per attempt (a fresh
interpreter per kill would spend ~2 s importing). Each writer resumes from what is on disk, like
flamingo does, and writes the same item/chunk layout (``expected_keys``). ``hold_run``: a writer that
takes a run's lock (flock or lease) and sleeps until it is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

KEY = "abcdef123456"

_ZYGOTE = textwrap.dedent(
    """
    import os, sys
    from flamingo_cli.records import AudioItem, Chunk, Result, error_result
    from flamingo_cli.sink import Sink

    def write(out, n_items, rows_per_part, chunk_errors):
        sink = Sink(out, "abcdef123456", {}, model="m", task="t", rows_per_part=rows_per_part)
        index = sink.load_index()
        print("ready", len(index), flush=True)
        for i in range(n_items):
            item_id = f"item{i:04d}"
            if index.is_done(item_id):
                continue
            item = AudioItem(id=item_id, path=f"/a/{item_id}.wav", extra={"n": i})
            if i % 11 == 5:  # an item that fails before chunking: one num_chunks = 0 row
                sink.write(error_result(item, "not decodable audio"))
                continue
            n = 1 + i % 4
            done = index.done_chunks(item_id)
            for c in range(n):
                if c in done:
                    continue
                chunk = Chunk(item=item, index=c, num_chunks=n, start_s=c, end_s=c + 1.0, samples=None, duration_s=n)
                err = "audio too short" if (chunk_errors and i % 13 == 7 and c == n - 1) else None
                sink.write(Result(chunk=chunk, prompt="p", caption=None if err else "x" * 50, error=err))
        sink.close()
        print("complete", flush=True)

    out, n_items, rows_per_part, chunk_errors = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            write(out, n_items, rows_per_part, chunk_errors)
            os._exit(0)
        print("pid", pid, flush=True)
        os.waitpid(pid, 0)
        print("exited", flush=True)
    """
)

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from flamingo_cli.sink import Sink
    s = Sink(sys.argv[1], sys.argv[2], {}, model="m", task="t")
    print("locked", flush=True)
    time.sleep(600)
    """
)


def expected_keys(n_items: int) -> set[tuple[str, int]]:
    """Every (id, chunk_index) a zygote's writers write for ``n_items`` items."""
    keys = set()
    for i in range(n_items):
        n = 1 if i % 11 == 5 else 1 + i % 4
        keys |= {(f"item{i:04d}", c) for c in range(n)}
    return keys


class Zygote:
    """The forking writer of run ``KEY`` of ``out``: ``start`` one writer, ``kill`` it, or ``finish`` one."""

    def __init__(
        self, out: str | Path, n_items: int, env: dict[str, str], rows_per_part: int = 1, chunk_errors: bool = False
    ) -> None:
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - kept open for the zygote's life
        args = [str(out), str(n_items), str(rows_per_part), "1" if chunk_errors else "0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def _go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def _until_exited(self) -> list[str]:
        assert self.proc.stdout is not None
        lines = []
        while (line := self.proc.stdout.readline().strip()) != "exited":
            assert line or self.proc.poll() is None, self.stderr()
            lines.append(line)
        return lines

    def start(self) -> tuple[int, int]:
        """Fork the next writer; its pid and the rows its resume index found, once it is ready."""
        assert self.proc.stdout is not None
        self._go()
        pid, before = None, None
        while pid is None or before is None:
            line = self.proc.stdout.readline().split()
            assert line, self.stderr() if self.proc.poll() is not None else "zygote said nothing"
            pid = int(line[1]) if line[0] == "pid" else pid
            before = int(line[1]) if line[0] == "ready" else before
        return pid, before

    def kill(self, pid: int) -> None:
        """SIGKILL the writer ``pid`` and wait for it; it must not have finished first."""
        os.kill(pid, signal.SIGKILL)
        assert "complete" not in self._until_exited(), "finished before the kill: make the corpus larger"

    def finish(self) -> None:
        """Let one more writer run to the end."""
        self._go()
        assert "complete" in self._until_exited(), self.stderr()

    def close(self, timeout: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        self._stderr.close()


def hold_run(out: str | Path, key: str, env: dict[str, str]) -> subprocess.Popen:
    """A process that holds run ``key`` of ``out`` (its lock or lease) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), key], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
