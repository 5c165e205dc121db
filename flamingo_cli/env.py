"""The process's surroundings in one object (streams, TTY, consoles) and the exit codes.

Like httpie's Environment: commands take an Environment instead of touching sys.stdout, so tests run
``main()`` in-process with captured streams.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console


class ExitStatus(enum.IntEnum):
    """Documented exit codes (README: "Exit codes")."""

    OK = 0  # every item captioned
    ITEMS_FAILED = 1  # the run finished, some items or chunks failed (their rows say why)
    USAGE = 2  # bad arguments, presets, inputs or output directory; nothing was run
    ENGINE = 3  # the model could not be loaded or the engine died; finished rows are kept
    OUTPUT = 4  # the output could not be written (disk full, permissions); finished rows are kept
    LOCKED = 5  # another flamingo process is writing the same output run
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM


@dataclass
class Environment:
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    stdout_isatty: bool | None = None
    stderr_isatty: bool | None = None

    def __post_init__(self) -> None:
        if self.stdout_isatty is None:
            self.stdout_isatty = _isatty(self.stdout)
        if self.stderr_isatty is None:
            self.stderr_isatty = _isatty(self.stderr)
        self.out = Console(file=self.stdout, force_terminal=self.stdout_isatty, soft_wrap=False, highlight=False)
        self.err = Console(file=self.stderr, force_terminal=self.stderr_isatty, highlight=False)

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)

    def info(self, message: str) -> None:
        self.err.print(message, markup=False, highlight=False)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
