"""Drawing a run's progress: Rich on a terminal, plain lines off it.

On a terminal: a Rich live panel (files and chunks done/total, audio hours, speed, ETA, errors, the
model) redrawn four times a second by Rich's own thread, so it keeps moving while the engine steps.
Off a terminal (cron, pipes, CI): no animation and no carriage returns, one plain ``key=value`` line
every ``interval`` seconds (from a timer thread, so a long engine step does not delay it) and the
summary's ``done:`` line at the end. ``--log-file`` gets the same plain lines (and whatever ``log``
is handed: the start and ``done`` lines) in either case.

The numbers come from a callable (``tally.Tally.snapshot``); the summary document from
``summary.py``. Totals: the inputs are read lazily, so the files total is known once the run's one
walk of them has finished (the count so far before), the chunk and audio totals once the executor has
read every input ("…" before that).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from flamingo_cli.env import Environment
from flamingo_cli.summary import UNKNOWN, hms, now_iso, passed_over_field, summary_line

REFRESH_PER_SECOND = 4


def _of(done: Any, total: Any) -> str:
    return f"{done}/{UNKNOWN if total is None else total}"


def _passed_over(counts: dict[str, int]) -> str:
    """``skipped 11 files: .xyz ×8, .txt ×3 (--ext all to try them)``, or "" when none."""
    from flamingo_cli.sources import describe_skipped

    text = describe_skipped(counts)
    return f"{text} (--ext all to try them)" if text else ""


def _hours(seconds: float | None) -> str:
    return UNKNOWN if seconds is None else f"{seconds / 3600:.3f}"


class Progress:
    """The live display, the periodic log lines, the end-of-run summary as a table or a line.

    Use: ``with progress.engine_start(): ...``, then ``start()``; ``tick()`` may be called often (a timer
    thread calls it too); ``close()`` in a ``finally``; ``finish(doc)`` shows the summary document.
    """

    def __init__(
        self,
        env: Environment,
        numbers: Callable[[], dict[str, Any]],
        model: str = "",
        *,
        task: str = "",
        quiet: bool = False,
        interval: float = 30.0,
        log_file: Path | None = None,
        run_key: str = "",
    ) -> None:
        self.env, self.numbers, self.model, self.task, self.quiet = env, numbers, model, task, quiet
        self.interval = max(0.05, float(interval))
        self.log_file = Path(log_file) if log_file else None
        self.run_key = run_key
        self.engine_start_s: float | None = None
        self._started = False
        self._last_line = 0.0
        self._line_lock = threading.Lock()
        self._stop_lines = threading.Event()
        self._line_thread: threading.Thread | None = None
        self._live: Any = None

    # -- output channels ---------------------------------------------------------------------------

    @property
    def tty(self) -> bool:
        return bool(self.env.stderr_isatty) and not self.quiet

    def _plain(self, line: str) -> None:
        """One line on stderr as is: no Rich wrapping at 80 columns, no markup, no carriage returns."""
        if self.quiet:
            return
        self.env.stderr.write(line + "\n")
        self.env.stderr.flush()

    def log(self, event: str, fields: dict[str, Any] | str) -> None:
        """Append ``<time> [flamingo] <event> <fields>`` to ``--log-file`` (if any)."""
        if self.log_file is None:
            return
        body = fields if isinstance(fields, str) else " ".join(f"{k}={v}" for k, v in fields.items())
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{now_iso()} [flamingo] {event} {body}\n")
        except OSError as exc:
            self.env.warn(f"{self.log_file}: cannot append to the log file ({exc.strerror or exc})")
            self.log_file = None

    # -- engine start ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def engine_start(self) -> Iterator[None]:
        """A spinner (terminal) or a line (logs) while the model loads; times it (``engine_start_s``)."""
        t0 = time.monotonic()
        what = f"starting the vLLM engine for {self.model}"
        self.log("engine_start", {"model": self.model})
        if self.tty:
            with self._status_console() as console, self._spinner(console, f"{what} … (a minute or more)"):
                yield
        else:
            self._plain(f"{what} …")
            yield
        self.engine_start_s = time.monotonic() - t0
        self._plain(f"engine ready in {self.engine_start_s:.1f} s")
        self.log("engine_ready", {"seconds": round(self.engine_start_s, 1)})

    @staticmethod
    @contextlib.contextmanager
    def _spinner(console: Any, text: str) -> Iterator[None]:
        """A spinner line that leaves sys.stdout/sys.stderr alone (``console.status`` would redirect
        them onto the terminal, letting through the Python-level warnings of vLLM's own import)."""
        from rich.live import Live
        from rich.spinner import Spinner

        live = Live(
            Spinner("dots", text=text),
            console=console,
            refresh_per_second=10,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        live.start()
        try:
            yield
        finally:
            live.stop()

    @contextlib.contextmanager
    def _status_console(self) -> Iterator[Any]:
        """A console on a duplicate of the terminal's fd: vLLM's start points fd 2 at its log file."""
        from rich.console import Console

        stream = None
        try:
            stream = os.fdopen(os.dup(self.env.stderr.fileno()), "w", buffering=1, encoding="utf-8")
        except (AttributeError, OSError, ValueError):
            stream = None
        try:
            yield Console(file=stream, force_terminal=True, highlight=False) if stream else self.env.err
        finally:
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    # -- the run -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin showing the numbers: the live panel on a terminal, the line thread off one (or for the log)."""
        self._started = True
        self._last_line = time.monotonic()
        if (not self.tty and not self.quiet) or self.log_file is not None:
            self._line_thread = threading.Thread(target=self._lines, name="flamingo-progress", daemon=True)
            self._line_thread.start()
        if self.tty:
            from rich.live import Live

            self._live = Live(
                console=self.env.err,
                get_renderable=self.renderable,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def renderable(self) -> Any:
        """The live panel (also used by tests to see what a person sees)."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        p = self.numbers()
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        run = f"run {self.run_key}" if self.run_key else ""
        grid.add_row("model", Text(" · ".join(x for x in (self.model, self.task, run) if x)))
        if p["audio_s_total"]:
            bar = ProgressBar(total=p["audio_s_total"], completed=p["audio_s_done"], width=40)
            pct = f"{100 * min(1.0, p['audio_s_done'] / p['audio_s_total']):.0f}%"
        elif p["files_total"]:
            bar = ProgressBar(total=p["files_total"], completed=p["files_done"], width=40)
            pct = f"{100 * min(1.0, p['files_done'] / p['files_total']):.0f}% of files"
        else:
            bar, pct = ProgressBar(total=None, width=40, pulse=True), ""
        bars = Table.grid(padding=(0, 1))
        bars.add_row(bar, pct)
        grid.add_row("", bars)
        extra = []
        if p["files_skipped"]:
            extra.append(f"{p['files_skipped']} already done")
        if p["files_changed"]:
            extra.append(f"{p['files_changed']} changed, redone")
        if p["files_failed"]:
            extra.append(f"{p['files_failed']} failed")
        more = f"  ({', '.join(extra)})" if extra else ""
        found = p.get("files_found")
        if p["files_total"] is None and found:  # the walk is still reading the inputs
            more += f"  ({found} found so far)"
        grid.add_row("files", f"{_of(p['files_done'], p['files_total'])} done{more}")
        dropped = f", {p['chunks_dropped']} dropped" if p["chunks_dropped"] else ""
        dropped += f", {p['rows_flagged']} flagged" if p.get("rows_flagged") else ""  # issue 25b
        chunks = _of(p["chunks_done"], p["chunks_total"])
        grid.add_row("chunks", f"{chunks} done  ({p['chunks_failed']} failed{dropped}{_gated(p)})")
        grid.add_row("audio", f"{_hours(p['audio_s_done'])}/{_hours(p['audio_s_total'])} h")
        grid.add_row("speed", f"{p['x_realtime']:.1f}× real time · {p['windows_per_s']:.2f} windows/s")
        grid.add_row("time", f"elapsed {hms(p['elapsed_s'])} · ETA {hms(p['eta_s'])}")
        grid.add_row("errors", Text(str(p["errors"]), style="red" if p["errors"] else ""))
        passed_over = _passed_over(p["passed_over_by_ext"])
        if passed_over:
            grid.add_row("passed over", Text(passed_over, style="yellow"))
        return grid

    def line(self) -> str:
        """The periodic plain log line."""
        p = self.numbers()
        return (
            f"[flamingo {datetime.now().strftime('%H:%M:%S')}] files={_of(p['files_done'], p['files_total'])} "
            f"skipped={p['files_skipped']} failed_files={p['files_failed']} "
            f"chunks={_of(p['chunks_done'], p['chunks_total'])} chunk_errors={p['chunks_failed']} "
            f"{_gated_fields(p)}"
            f"flagged={p.get('rows_flagged', 0)} "
            f"audio_h={_hours(p['audio_s_done'])}/{_hours(p['audio_s_total'])} "
            f"x_rt={p['x_realtime']:.1f} win_s={p['windows_per_s']:.2f} "
            f"elapsed={hms(p['elapsed_s'])} eta={hms(p['eta_s'])} model={self.model}"
            f"{passed_over_field(p['passed_over_by_ext'])}"
        )

    def tick(self) -> None:
        """Emit a plain line if ``interval`` has passed. A background thread calls it too, so lines keep
        their rhythm while one engine step takes long; the terminal panel refreshes by itself."""
        if not self._started:
            return
        with self._line_lock:
            now = time.monotonic()
            if now - self._last_line < self.interval:
                return
            self._last_line = now
            line = self.line()
            if not self.tty and not self.quiet:
                self._plain(line)
            if self.log_file is not None:
                self.log("progress", line.split("] ", 1)[1])

    def _lines(self) -> None:
        while not self._stop_lines.wait(min(self.interval, 1.0) / 2):
            with contextlib.suppress(Exception):
                self.tick()

    def close(self) -> None:
        """Stop the panel and the line thread (called in a ``finally``; twice is fine)."""
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.refresh()
                self._live.stop()
            self._live = None
        self._stop_lines.set()
        if self._line_thread is not None:
            self._line_thread.join(timeout=5)
            self._line_thread = None

    # -- the end -----------------------------------------------------------------------------------

    def finish(self, doc: dict[str, Any], show: bool = True) -> None:
        """Show the summary document: a table (terminal) or the ``done:`` line (logs); the log's last line."""
        line = summary_line(doc)
        if show and not self.quiet:
            if self.env.stderr_isatty:
                self.env.err.print(self.summary_table(doc))
            else:
                self._plain(line)
        self.log("done", line.removeprefix("done: "))

    @staticmethod
    def summary_table(doc: dict[str, Any]) -> Any:
        from rich.table import Table

        table = Table(title=f"flamingo run {doc['run_key']}: {doc['status']}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        failed = doc["files_failed"]
        table.add_row("files ok", str(doc["files_ok"]))
        table.add_row("files failed", f"[red]{failed}[/]" if failed else "0")
        table.add_row("files already done", str(doc["files_skipped"]))
        table.add_row("chunks ok / failed", f"{doc['chunks_ok']} / {doc['chunks_failed']}")
        if doc.get("chunks_silent") or doc.get("chunks_duplicate"):  # gates: no engine request for these
            table.add_row("chunks silent / duplicate", f"{doc['chunks_silent']} / {doc['chunks_duplicate']}")
            table.add_row("engine requests", str(doc["requests_sent"]))
        table.add_row("audio", f"{doc['audio_hours']:.3f} h")
        table.add_row("wall time", hms(doc["wall_s"]))
        if doc["engine_start_s"] is not None:
            table.add_row("engine start", f"{doc['engine_start_s']:.1f} s")
        if doc.get("time_to_first_row_s") is not None:
            table.add_row("first row after", f"{doc['time_to_first_row_s']:.1f} s")
        table.add_row("speed", f"{doc['x_realtime']:.1f}× real time · {doc['windows_per_s']:.2f} windows/s")
        if doc.get("generation_s"):
            table.add_row(
                "generation",
                f"{doc['generation_s']:.1f} s · {doc['rows_per_generation_s']:.1f} rows/s · "
                f"{doc['windows_per_generation_s']:.2f} windows/s · {doc['audio_s_per_generation_s']:.1f}× real time",
            )
        if doc.get("audio_hours_per_gpu_hour") is not None:
            gpus = f"{doc['gpus']} GPU{'s' * (doc['gpus'] != 1)}"
            table.add_row("audio h per GPU h", f"{doc['audio_hours_per_gpu_hour']:.1f} ({gpus})")
        table.add_row("rows written", str(doc["rows_written"]))
        passed_over = _passed_over(doc.get("files_passed_over_by_ext") or {})
        if passed_over:
            table.add_row("passed over", passed_over)
        if doc["out"]:
            table.add_row("output", doc["out"])
        return table


def _gated(p: dict[str, Any]) -> str:
    """The gates' chunks for the live panel: ", 3 silent, 2 duplicate" (nothing when none)."""
    parts = [f"{p[k]} {w}" for k, w in (("chunks_silent", "silent"), ("chunks_duplicate", "duplicate")) if p.get(k)]
    return "".join(", " + x for x in parts)


def _gated_fields(p: dict[str, Any]) -> str:
    """The same for the plain log line: "silent=3 duplicate=2 requests=40 " (nothing when none)."""
    if not (p.get("chunks_silent") or p.get("chunks_duplicate")):
        return ""
    return f"silent={p['chunks_silent']} duplicate={p['chunks_duplicate']} requests={p['requests_sent']} "
