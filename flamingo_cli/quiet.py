"""Keep vLLM's own output off the operator's terminal unless ``--verbose``.

vLLM's logger honours ``VLLM_LOGGING_LEVEL``, but its engine-core and worker processes still write to
the inherited stderr: "Loading safetensors checkpoint shards" bars (tqdm with an explicit
``disable=``, so ``TQDM_DISABLE`` cannot reach them), torch's Python-side ``W1127 ...`` warnings and
c10 ``[W ... utils.cpp]`` warnings, each behind a ``(Worker pid=N)`` prefix. The only switch that
catches all of it is the file descriptors those processes inherit: while the engine starts, fds 1 and 2
point at a log file, so every process vLLM spawns writes there for its whole life, and the parent's
fds are restored as soon as ``LLM(...)`` returns. When the start fails, the log's tail is what explains
it ("Engine core initialization failed. See root cause above." says the parent); ``log_tail`` reads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Environment defaults for a quiet engine; applied with setdefault, so a user's own setting wins.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TQDM_DISABLE": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def engine_log_path() -> Path:
    """A per-process log file for vLLM's output (``$TMPDIR/flamingo-vllm-<pid>.log``)."""
    return Path(tempfile.gettempdir()) / f"flamingo-vllm-{os.getpid()}.log"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()


@contextlib.contextmanager
def redirect_fds(path: Path) -> Iterator[None]:
    """Point fds 1 and 2 at ``path`` (append) for the duration; child processes keep it for good.

    Python-level ``sys.stdout``/``sys.stderr`` objects keep working: they write to fds 1/2 and so land
    in the log until the fds are restored. If the fds cannot be duplicated (no real fds: some embedded
    interpreters), nothing is redirected.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        yield
        return
    saved: list[int] = []
    try:
        _flush()
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:
            saved = []
        if saved:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        yield
    finally:
        _flush()
        for target, dup in zip((1, 2), saved, strict=False):
            with contextlib.suppress(OSError):
                os.dup2(dup, target)
            os.close(dup)
        os.close(fd)


def log_tail(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log file (empty if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


# --- native decoder chatter ----------------------------------------------------------------------------

# What C decoders print straight to fd 2 on damaged or odd frames: libmpg123 (inside libsndfile) writes
# "[src/libmpg123/layer3.c:INT123_do_layer3():1804] error: part2_3_length (3264) too large …" and its
# notes, every one "Note: …" ("Illegal Audio-MPEG-Header …", "Trying to resync...", "Hit end of
# (available) data during resync." on a file that is not MPEG audio at all, ID3/Xing/RVA details), with
# fprintf(stderr), past Python; and two "Warning: …" lines. The file still decodes (or fails with its own
# error row); the lines are notes for whoever debugs the decoder.
DECODER_LINE = re.compile(
    rb"^(?:\[[^\]\n]*(?:libmpg123|mpg123)[^\]\n]*\]"
    rb"|Note: "
    rb"|Warning: (?:Xing stream size|buf\[5\]|missing marker in time stamp)"
    rb"|\[?mpg123\]?[: ])"
)
DECODER_LOGGER = "flamingo.decoder"
# While a DecoderChatter runs: whether the stderr it forwards to is a terminal (fd 2 itself is its pipe).
_FD2_IS_TTY: bool | None = None


def routed_isatty(stream: Any) -> bool | None:
    """Whether ``stream`` (writing to fd 2, which a ``DecoderChatter`` routes through its pipe) ends on a
    terminal; None when no chatter router runs or ``stream`` is not fd 2 (ask ``stream.isatty()``)."""
    if _FD2_IS_TTY is None:
        return None
    try:
        return _FD2_IS_TTY if stream.fileno() == 2 else None
    except (AttributeError, OSError, ValueError):
        return None


class DecoderChatter:
    """Route fd 2 through a pipe: decoder lines go to the ``flamingo.decoder`` logger, the rest through.

    Everything the process (and the children it starts) writes to fd 2 goes into one pipe, in order; a
    thread forwards it unchanged to the real stderr, except whole lines ``DECODER_LINE`` matches, which
    go to ``logging.getLogger("flamingo.decoder")`` at INFO (silent unless the embedding program
    configures logging) and are counted. Installed by the console script for the whole process; ``stop``
    puts fd 2 back and forwards what is left. Without real fds (embedded interpreters) it does nothing.
    """

    def __init__(self) -> None:
        self.lines = 0
        self._saved: int | None = None
        self._read: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> DecoderChatter:
        try:
            _flush()
            saved = os.dup(2)
            r, w = os.pipe()
        except OSError:
            return self
        global _FD2_IS_TTY
        _FD2_IS_TTY = os.isatty(saved)  # a live display still draws on the terminal behind the pipe
        os.dup2(w, 2)
        os.close(w)
        os.set_blocking(r, False)
        self._saved, self._read = saved, r
        self._thread = threading.Thread(target=self._pump, name="flamingo-stderr", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        assert self._read is not None
        pending = b""
        while True:
            stopping = self._stop.is_set()
            ready, _, _ = select.select([self._read], [], [], 0.05)
            data = b""
            if ready:
                try:
                    data = os.read(self._read, 65536)
                except BlockingIOError:
                    data = b""
                except OSError:
                    break
                if not data and not stopping:  # every writer closed its end
                    stopping = True
            pending = self._forward(pending + data, final=stopping and not data)
            if stopping and not data:
                break
        if pending:
            self._write(pending)

    def _forward(self, buf: bytes, final: bool) -> bytes:
        """Pass ``buf`` on line by line; returns a partial last line kept back only while it may be chatter."""
        out = bytearray()
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start : end + 1]
            if DECODER_LINE.match(line):
                self.lines += 1
                logging.getLogger(DECODER_LOGGER).info(line.decode("utf-8", "replace").rstrip())
            else:
                out += line
            start = end + 1
        rest = buf[start:]
        # A partial line (a progress bar's redraw, a prompt) goes on at once unless it starts like chatter.
        if rest and (final or not _may_be_chatter(rest)):
            out += rest
            rest = b""
        if out:
            self._write(bytes(out))
        return rest

    def _write(self, data: bytes) -> None:
        if self._saved is None:
            return
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._saved, data) :]

    def stop(self) -> None:
        """Put fd 2 back and forward what is still in the pipe (children may keep writing to it: not waited)."""
        if self._saved is None:
            return
        global _FD2_IS_TTY
        _flush()
        os.dup2(self._saved, 2)
        _FD2_IS_TTY = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self._saved)
        self._saved = None

    def __enter__(self) -> DecoderChatter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _may_be_chatter(partial: bytes) -> bool:
    return partial.startswith((b"[", b"Note:", b"Warning:", b"mpg123")) and len(partial) < 4096
