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
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
