"""Every failure flamingo reports, and the one table that turns a failure into an exit status.

Modules raise these (or subclasses named for their stage: ``spec.SpecError``, ``manifests.SourceError``,
``config.ConfigError`` are usage errors; ``engine.EngineError`` re-exports the class here), so the Python API
raises the same exception for the same mistake as the CLI exits with the same code. ``exit_status`` is the
table; ``cli.main`` and the run summary both use it (like httpie's ``raw_main``: one place maps exceptions to
``ExitStatus``).
"""

from __future__ import annotations

import signal

from flamingo_cli.env import ExitStatus


class FlamingoError(Exception):
    """Base of flamingo's own failures; ``status`` is the exit code it means."""

    status: ExitStatus = ExitStatus.INTERNAL


class UsageError(FlamingoError, ValueError):
    """A bad option, preset, schema, input or output folder: nothing was run (exit 2)."""

    status = ExitStatus.USAGE


class EngineError(FlamingoError):
    """The engine could not start or died; the run's finished rows are kept (exit 3)."""

    status = ExitStatus.ENGINE


class OutputError(FlamingoError):
    """The output cannot be written or read (exit 4; 2 when found before the model loads)."""

    status = ExitStatus.OUTPUT


class LockedError(OutputError):
    """Another flamingo process holds this output run (exit 5)."""

    status = ExitStatus.LOCKED


class Stopped(FlamingoError):
    """A SIGINT/SIGTERM stopped the run after the finished rows were written (exit 130 / 143)."""

    def __init__(self, signum: int, message: str = "stopped; finished rows are saved") -> None:
        super().__init__(message)
        self.signum = signum
        self.status = ExitStatus.TERMINATED if signum == signal.SIGTERM else ExitStatus.INTERRUPTED


def is_click_usage(exc: BaseException) -> bool:
    """click's usage errors, from click itself or from the copy typer >= 0.29 vendors (``typer._click``):
    they are not subclasses of each other, so they are recognised by their base class names."""
    return any(
        cls.__name__ in ("UsageError", "BadParameter", "ClickException", "NoSuchOption", "MissingParameter")
        and cls.__module__.split(".")[0] in ("click", "typer")
        for cls in type(exc).__mro__
    )


def exit_status(exc: BaseException) -> ExitStatus:
    """The exit status a failure means: the one table."""
    if isinstance(exc, FlamingoError):
        return exc.status
    status = getattr(exc, "status", None)
    if isinstance(status, ExitStatus):  # an exception that says which exit it means (tests, embedders)
        return status
    if isinstance(exc, KeyboardInterrupt):
        return ExitStatus.INTERRUPTED
    if is_click_usage(exc):
        return ExitStatus.USAGE
    return ExitStatus.INTERNAL
