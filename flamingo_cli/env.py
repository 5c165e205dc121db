"""The process's surroundings in one object (streams, TTY, consoles) and the exit codes.

Like httpie's Environment: commands take an Environment instead of touching sys.stdout, so tests run
``main()`` in-process with captured streams.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console
from rich.text import Text


class ExitStatus(enum.IntEnum):
    """Documented exit codes (README: "Exit codes")."""

    OK = 0  # every item captioned
    ITEMS_FAILED = 1  # the run finished, some items or chunks failed (their rows say why)
    USAGE = 2  # bad arguments, presets, inputs or output directory; nothing was run
    ENGINE = 3  # the model could not be loaded or the engine died; finished rows are kept
    OUTPUT = 4  # the output could not be written (disk full, permissions); finished rows are kept
    LOCKED = 5  # another flamingo process is writing the same output run
    INTERNAL = 70  # a bug in flamingo (EX_SOFTWARE): a traceback was printed; finished rows are kept
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM


@dataclass
class Environment:
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    stdout_isatty: bool | None = None
    stderr_isatty: bool | None = None
    # An already started engine (``engine.Engine``) for every run of this environment instead of vLLM:
    # how tests and embedding programs swap engines, with no monkeypatching.
    engine: Any = None

    def __post_init__(self) -> None:
        if self.stdout_isatty is None:
            self.stdout_isatty = _isatty(self.stdout)
        if self.stderr_isatty is None:
            self.stderr_isatty = _isatty(self.stderr)
        self.out = Console(file=self.stdout, force_terminal=self.stdout_isatty, soft_wrap=False, highlight=False)
        # Off a terminal (cron mail, log files) messages stay on one line each: no wrapping at 80 columns.
        self.err = Console(
            file=self.stderr, force_terminal=self.stderr_isatty, soft_wrap=not self.stderr_isatty, highlight=False
        )

    # Messages are plain text, never markup: "[task]" or "[sampling]" in a message (TOML tables, a
    # path) must print as written. Only the "error:"/"warning:" label is styled, as a Text span.

    def error(self, message: str) -> None:
        self._labelled("error:", "bold red", message)

    def warn(self, message: str) -> None:
        self._labelled("warning:", "yellow", message)

    def info(self, message: str) -> None:
        self.err.print(Text(_printable(message)), highlight=False)

    def _labelled(self, label: str, style: str, message: str) -> None:
        text = Text(label, style=style)
        text.append(" " + _printable(message))
        self.err.print(text, highlight=False)


def _printable(message: str) -> str:
    """A message may quote a file name that is not UTF-8 (surrogateescape): show it escaped, never crash."""
    from flamingo_cli.paths import escape_path

    return escape_path(str(message))


def _isatty(stream: IO[str]) -> bool:
    from flamingo_cli.quiet import routed_isatty

    routed = routed_isatty(stream)  # the console script routes fd 2 through a pipe (decoder chatter)
    if routed is not None:
        return routed
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- child processes outlive nothing ------------------------------------------------------------------

# A tiny process that waits for its stdin to close, which happens however flamingo exits (even SIGKILL
# or the OOM killer), then stops the processes it was told about. vLLM's engine process and its workers
# do not notice their parent's death: without this they would sit on the GPU memory (and spin a CPU)
# until someone kills them, and the next night's run could not load its model.
_REAPER = r"""
import signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # a Ctrl-C to the process group must not take the guard first
import psutil
watched = []
for line in sys.stdin:
    pid, created = line.split()
    watched.append((int(pid), float(created)))
alive = []
for pid, created in watched:
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 1e-3:  # not a recycled pid
            p.terminate()
            alive.append(p)
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(alive, timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


class _ChildReaper:
    def __init__(self) -> None:
        self._proc = None
        self._sent: set[int] = set()

    def guard(self) -> int:
        """Make every current descendant of this process die with it; returns how many are newly guarded."""
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil comes with vLLM
            return 0
        import subprocess

        me = psutil.Process()
        skip = {self._proc.pid} if self._proc is not None else set()
        kids = [p for p in me.children(recursive=True) if p.pid not in skip and p.pid not in self._sent]
        if not kids:
            return 0
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _REAPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                close_fds=True,
            )
        lines = []
        for p in kids:
            try:
                lines.append(f"{p.pid} {p.create_time()!r}\n")
                self._sent.add(p.pid)
            except psutil.Error:
                continue
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write("".join(lines))
            self._proc.stdin.flush()
        except OSError:
            return 0
        return len(lines)


_reaper = _ChildReaper()


def reap_children_on_exit() -> int:
    """After the engine started: its processes (and any other child) are stopped when flamingo exits.

    Costs one small helper process per flamingo process; idempotent (only new children are sent).
    """
    return _reaper.guard()
