"""Progress for people and for logs.

On a terminal: a Rich live panel (files and chunks done/total, audio hours, speed, ETA, errors, the
model) redrawn four times a second by Rich's own thread, so it keeps moving while the engine steps.
Off a terminal (cron, pipes, CI): no animation and no carriage returns, one plain ``key=value`` line
every ``interval`` seconds (from a timer thread, so a long engine step does not delay it) and a
summary at the end. ``--log-file`` appends the same plain lines (and a start and a final line) to a
file in either case; ``--summary-json`` writes the end-of-run numbers atomically for monitoring.

Totals: the pipeline reads its inputs lazily, so the chunk and audio totals are known only once the
inputs are exhausted ("…" before that). The number of files is counted sooner by a background walk of
the same inputs (no decoding), which also gives an early, file-based ETA.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.errors import exit_status

UNKNOWN = "…"
REFRESH_PER_SECOND = 4

_STATUS_NAMES = {
    ExitStatus.OK: "ok",
    ExitStatus.ITEMS_FAILED: "items_failed",
    ExitStatus.USAGE: "usage_error",
    ExitStatus.ENGINE: "engine_error",
    ExitStatus.OUTPUT: "output_error",
    ExitStatus.LOCKED: "locked",
    ExitStatus.INTERRUPTED: "interrupted",
    ExitStatus.TERMINATED: "terminated",
    ExitStatus.INTERNAL: "internal_error",
}


def hms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return UNKNOWN
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _of(done: Any, total: Any) -> str:
    return f"{done}/{UNKNOWN if total is None else total}"


def _hours(seconds: float | None) -> str:
    return UNKNOWN if seconds is None else f"{seconds / 3600:.3f}"


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def summary_fields(s: dict[str, Any]) -> dict[str, Any]:
    """Rates from a ``Stats.snapshot()`` (kept for callers that only have the stats)."""
    elapsed = max(1e-9, time.monotonic() - s["started"])
    return {
        "items": s["items_seen"],
        "skipped": s["items_skipped"],
        "failed_items": s["items_failed"],
        "chunks_done": s["chunks_done"],
        "chunks_failed": s["chunks_failed"],
        "audio_hours": s["audio_s_done"] / 3600,
        "x_realtime": s["audio_s_done"] / elapsed,
        "windows_per_s": s["windows_done"] / elapsed,
        "elapsed_s": elapsed,
    }


class _Watched:
    """The sink the pipeline writes to: delegates everything, and counts finished items on the way.

    An item is finished when rows for all the chunks the pipeline planned for it are written (a chunk
    error counts). The pipeline announces that number with ``begin_item`` (passed on to the sink);
    without it, chunks already in the resume index are subtracted from ``num_chunks``.
    """

    def __init__(self, sink: Any, index: Any = None, retry_failed: bool = False) -> None:
        self.sink = sink
        self.index = index
        self.retry_failed = retry_failed
        self._lock = threading.Lock()
        self._expected: dict[str, int] = {}
        self._got: dict[str, int] = {}
        self._had_error: set[str] = set()
        self.items_ok = 0
        self.items_with_errors = 0  # finished items with at least one chunk error
        self.chunk_errors_early = 0  # chunks failed before the engine (too short)

    def __getattr__(self, name: str) -> Any:
        if name == "sink":
            raise AttributeError(name)
        return getattr(self.sink, name)

    def begin_item(self, item_id: str, *args: Any) -> None:
        rows = int(args[-1]) if args else 0
        inner = getattr(self.sink, "begin_item", None)
        if inner is not None:
            inner(item_id, *args)
        with self._lock:
            self._expected[str(item_id)] = rows

    def _planned(self, item_id: str, num_chunks: int) -> int:
        expected = self._expected.get(item_id)
        if expected is not None:
            return expected
        if self.index is None or item_id not in self.index:
            return num_chunks
        done = set(self.index.done_chunks(item_id))
        if self.retry_failed and hasattr(self.index, "failed_chunks"):
            done -= set(self.index.failed_chunks(item_id))
        return num_chunks - len(done)

    def write(self, result: Any) -> None:
        self.sink.write(result)
        chunk = result.chunk
        item_id = str(chunk.item.id)
        with self._lock:
            if chunk.num_chunks <= 0:  # an item that failed before chunking: Stats counts it
                self._expected.pop(item_id, None)
                return
            if chunk.error is not None:
                self.chunk_errors_early += 1
            got = self._got.get(item_id, 0) + 1
            if result.error is not None:
                self._had_error.add(item_id)
            if got >= self._planned(item_id, chunk.num_chunks):
                self._got.pop(item_id, None)
                self._expected.pop(item_id, None)
                if item_id in self._had_error:
                    self._had_error.discard(item_id)
                    self.items_with_errors += 1
                else:
                    self.items_ok += 1
            else:
                self._got[item_id] = got

    @property
    def items_finished(self) -> int:
        return self.items_ok + self.items_with_errors


class _InputCounter(threading.Thread):
    """Counts the items the inputs will yield (a walk without decoding), for an early files total."""

    def __init__(self, inputs: Sequence[str], extensions: Any, shard: tuple[int, int] | None = None) -> None:
        super().__init__(name="flamingo-count", daemon=True)
        self.inputs, self.extensions, self.shard = list(inputs), extensions, shard
        self.count = 0
        self.total: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from flamingo_cli.sources import iter_items, select_shard

        try:
            n = 0
            found = iter_items(self.inputs, self.extensions, with_data=False)  # ids only: no audio bytes
            for _ in select_shard(found, *self.shard) if self.shard else found:
                if self.stop.is_set():
                    return
                n += 1
                self.count = n
            self.total = n
        except Exception:  # the pipeline reports input problems; the count just stays unknown
            return


class Progress:
    """The live display, the periodic log lines, the end-of-run summary.

    Use: ``with progress.engine_start(): ...``, then ``start(stats, ...)``, pass ``watch(sink)`` to the
    pipeline (``tick()`` may be called often; a timer thread calls it too), ``close()`` in a ``finally`` and
    ``finish(status)`` once the outcome is known. ``close()`` during an exception writes the summary
    with the exception's exit status, so monitoring sees failed runs too.
    """

    def __init__(
        self,
        env: Environment,
        stats: Any = None,
        model: str = "",
        *,
        task: str = "",
        quiet: bool = False,
        interval: float = 30.0,
        log_file: Path | None = None,
        summary_json: Path | None = None,
        out: str | Path | None = None,
        run_key: str = "",
    ) -> None:
        self.env, self.model, self.task, self.quiet = env, model, task, quiet
        self.interval = max(0.05, float(interval))
        self.log_file = Path(log_file) if log_file else None
        self.summary_json = Path(summary_json) if summary_json else None
        self.out, self.run_key = out, run_key
        self.stats: Any = None
        self.watched: _Watched | None = None
        self.counter: _InputCounter | None = None
        self.engine_start_s: float | None = None
        self.created = time.monotonic()
        self.started_at = _now_iso()
        self._last_line = 0.0
        self._line_lock = threading.Lock()
        self._stop_lines = threading.Event()
        self._line_thread: threading.Thread | None = None
        self._live: Any = None
        self._finished = False
        self._log("start", {"flamingo": __version__, "model": model, "task": task, "run": run_key, "out": out})
        if stats is not None:
            self.start(stats)

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

    def _log(self, event: str, fields: dict[str, Any] | str) -> None:
        if self.log_file is None:
            return
        body = fields if isinstance(fields, str) else " ".join(f"{k}={v}" for k, v in fields.items())
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(f"{_now_iso()} [flamingo] {event} {body}\n")
        except OSError as exc:
            self.env.warn(f"{self.log_file}: cannot append to the log file ({exc.strerror or exc})")
            self.log_file = None

    # -- engine start ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def engine_start(self) -> Iterator[None]:
        """A spinner (terminal) or a line (logs) while the model loads; times it."""
        t0 = time.monotonic()
        what = f"starting the vLLM engine for {self.model}"
        self._log("engine_start", {"model": self.model})
        try:
            if self.tty:
                with self._status_console() as console, self._spinner(console, f"{what} … (a minute or more)"):
                    yield
            else:
                self._plain(f"{what} …")
                yield
        except BaseException as exc:
            status = exit_status(exc)
            self.finish(int(status), error=str(exc), show=False)
            raise
        self.engine_start_s = time.monotonic() - t0
        self._plain(f"engine ready in {self.engine_start_s:.1f} s")
        self._log("engine_ready", {"seconds": round(self.engine_start_s, 1)})

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

    def start(
        self,
        stats: Any,
        inputs: Sequence[str] | None = None,
        extensions: Any = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Begin showing ``stats``; ``inputs`` (this ``shard`` of them) starts the background file count."""
        self.stats = stats
        self._last_line = time.monotonic()
        if (not self.tty and not self.quiet) or self.log_file is not None:
            self._line_thread = threading.Thread(target=self._lines, name="flamingo-progress", daemon=True)
            self._line_thread.start()
        if inputs is not None and (not self.quiet or self.log_file is not None):
            self.counter = _InputCounter(inputs, extensions, shard)
            self.counter.start()
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

    def watch(self, sink: Any, index: Any = None, retry_failed: bool = False) -> _Watched:
        """Wrap the sink the pipeline writes to, so finished files can be counted."""
        self.watched = _Watched(sink, index, retry_failed)
        return self.watched

    def snapshot(self) -> dict[str, Any]:
        """Every number the display, the log lines and the summary show (None = not known yet)."""
        s = self.stats.snapshot() if self.stats is not None else {}
        g = s.get
        now = time.monotonic()
        elapsed = max(1e-9, now - g("started", now))
        w = self.watched
        exhausted = bool(g("sources_exhausted", False))
        early = w.chunk_errors_early if w else 0
        skipped, failed_before = g("items_skipped", 0), g("items_failed", 0)
        finished = w.items_finished if w else 0
        files_total = g("items_seen", 0) if exhausted else (self.counter.total if self.counter else None)
        files_done = skipped + failed_before + finished
        if exhausted and w is None:  # no watched sink: the best count is "read"
            files_done = g("items_seen", 0)
        audio_done = g("audio_s_done", 0.0)
        audio_total = g("audio_s_queued", 0.0) if exhausted else None
        rate = audio_done / elapsed
        eta: float | None = None
        if exhausted and audio_total is not None:
            eta = max(0.0, audio_total - audio_done) / rate if rate > 0 else (0.0 if audio_total <= 0 else None)
        elif files_total is not None and files_done - skipped > 0:
            eta = max(0, files_total - files_done) * elapsed / (files_done - skipped)
        return {
            "model": self.model,
            "task": self.task,
            "files_done": files_done,
            "files_total": files_total,
            "files_skipped": skipped,
            "files_ok": w.items_ok if w else None,
            "files_failed": failed_before + (w.items_with_errors if w else 0),
            "chunks_done": g("chunks_done", 0) + g("chunks_failed", 0),
            "chunks_ok": g("chunks_done", 0),
            "chunks_failed": g("chunks_failed", 0),
            "chunks_dropped": g("chunks_dropped", 0),
            "files_changed": g("items_changed", 0),
            "chunks_total": g("chunks_queued", 0) + early if exhausted else None,
            "audio_s_done": audio_done,
            "audio_s_total": audio_total,
            "windows_done": g("windows_done", 0),
            "prompt_tokens": g("prompt_tokens", 0),
            "output_tokens": g("output_tokens", 0),
            "x_realtime": rate,
            "windows_per_s": g("windows_done", 0) / elapsed,
            "elapsed_s": elapsed,
            "eta_s": eta,
            "errors": failed_before + g("chunks_failed", 0),
        }

    def renderable(self) -> Any:
        """The live panel (also used by tests to see what a person sees)."""
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        p = self.snapshot()
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
        grid.add_row("files", f"{_of(p['files_done'], p['files_total'])} done{more}")
        dropped = f", {p['chunks_dropped']} dropped" if p["chunks_dropped"] else ""
        chunks = _of(p["chunks_done"], p["chunks_total"])
        grid.add_row("chunks", f"{chunks} done  ({p['chunks_failed']} failed{dropped})")
        grid.add_row("audio", f"{_hours(p['audio_s_done'])}/{_hours(p['audio_s_total'])} h")
        grid.add_row("speed", f"{p['x_realtime']:.1f}× real time · {p['windows_per_s']:.2f} windows/s")
        grid.add_row("time", f"elapsed {hms(p['elapsed_s'])} · ETA {hms(p['eta_s'])}")
        grid.add_row("errors", Text(str(p["errors"]), style="red" if p["errors"] else ""))
        return grid

    def line(self) -> str:
        """The periodic plain log line."""
        p = self.snapshot()
        return (
            f"[flamingo {datetime.now().strftime('%H:%M:%S')}] files={_of(p['files_done'], p['files_total'])} "
            f"skipped={p['files_skipped']} failed_files={p['files_failed']} "
            f"chunks={_of(p['chunks_done'], p['chunks_total'])} chunk_errors={p['chunks_failed']} "
            f"audio_h={_hours(p['audio_s_done'])}/{_hours(p['audio_s_total'])} "
            f"x_rt={p['x_realtime']:.1f} win_s={p['windows_per_s']:.2f} "
            f"elapsed={hms(p['elapsed_s'])} eta={hms(p['eta_s'])} model={self.model}"
        )

    def tick(self) -> None:
        """Emit a plain line if ``interval`` has passed. A background thread calls it too, so lines keep
        their rhythm while one engine step takes long; the terminal panel refreshes by itself."""
        if self.stats is None:
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
                self._log("progress", line.split("] ", 1)[1])

    def _lines(self) -> None:
        while not self._stop_lines.wait(min(self.interval, 1.0) / 2):
            with contextlib.suppress(Exception):
                self.tick()

    def close(self) -> None:
        """Stop the display and the counter. Called in a ``finally``: if an exception is on its way out,
        record the run as failed (summary JSON and log line) with the exception's exit status."""
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.refresh()
                self._live.stop()
            self._live = None
        if self.counter is not None:
            self.counter.stop.set()
        self._stop_lines.set()
        if self._line_thread is not None:
            self._line_thread.join(timeout=5)
            self._line_thread = None
        exc = sys.exc_info()[1]
        if exc is not None and not self._finished:
            status = exit_status(exc)
            self.finish(int(status), error=str(exc), show=False)

    # -- the end -----------------------------------------------------------------------------------

    def summary(self, status: int, error: str | None = None, reason: str | None = None) -> dict[str, Any]:
        p = self.snapshot()
        sink = self.watched.sink if self.watched is not None else None
        rows = parts = None
        if sink is not None:
            rows = int(getattr(sink, "rows_written", 0)) + int(getattr(sink, "buffered", 0) or 0)
            parts = getattr(sink, "parts_written", None)
        try:
            name = _STATUS_NAMES.get(ExitStatus(status), str(status))
        except ValueError:
            name = str(status)
        return {
            "status": name,
            "exit_code": int(status),
            "error": error,
            # why the run ended as it did, in words (the error, or e.g. "nothing to do")
            "reason": error or reason,
            "flamingo_version": __version__,
            "model": self.model,
            "task": self.task,
            "run_key": self.run_key,
            "out": str(self.out) if self.out is not None else None,
            "started_at": self.started_at,
            "finished_at": _now_iso(),
            "wall_s": round(time.monotonic() - self.created, 3),
            "engine_start_s": None if self.engine_start_s is None else round(self.engine_start_s, 3),
            "processing_s": round(p["elapsed_s"], 3) if self.stats is not None else 0.0,
            "files_seen": self.stats.snapshot()["items_seen"] if self.stats is not None else 0,
            "files_ok": p["files_ok"],
            "files_failed": p["files_failed"],
            "files_skipped": p["files_skipped"],
            "chunks_ok": p["chunks_ok"],
            "chunks_failed": p["chunks_failed"],
            "chunks_dropped": p["chunks_dropped"],
            "files_changed": p["files_changed"],
            "audio_hours": round(p["audio_s_done"] / 3600, 6),
            "x_realtime": round(p["x_realtime"], 3) if self.stats is not None else 0.0,
            "windows": p["windows_done"],
            "windows_per_s": round(p["windows_per_s"], 4) if self.stats is not None else 0.0,
            "prompt_tokens": p["prompt_tokens"],
            "output_tokens": p["output_tokens"],
            "rows_written": rows,
            "parts_written": parts,
        }

    def finish(
        self, status: int, error: str | None = None, show: bool = True, reason: str | None = None
    ) -> dict[str, Any]:
        """The end-of-run summary: a table (terminal) or a line (logs), the log file, the JSON file."""
        if self._finished:
            return {}
        self._finished = True
        doc = self.summary(status, error, reason)
        if show and not self.quiet:
            if self.env.stderr_isatty:
                self.env.err.print(self.summary_table(doc))
            else:
                self._plain(self.summary_line(doc))
        self._log("done", self.summary_line(doc).removeprefix("done: "))
        if self.summary_json is not None:
            try:
                write_json_atomic(self.summary_json, doc)
            except OSError as exc:
                self.env.warn(f"{self.summary_json}: cannot write the summary ({exc.strerror or exc})")
        return doc

    @staticmethod
    def summary_line(doc: dict[str, Any]) -> str:
        return (
            f"done: status={doc['status']} files_ok={doc['files_ok']} files_failed={doc['files_failed']} "
            f"files_skipped={doc['files_skipped']} chunks_ok={doc['chunks_ok']} chunks_failed={doc['chunks_failed']} "
            f"audio_h={doc['audio_hours']:.3f} wall={hms(doc['wall_s'])} processing_s={doc['processing_s']:.1f} "
            f"x_rt={doc['x_realtime']:.1f} rows={doc['rows_written']} out={doc['out']}"
        ) + (f" reason={json.dumps(doc['reason'], ensure_ascii=False)}" if doc.get("reason") else "")

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
        table.add_row("audio", f"{doc['audio_hours']:.3f} h")
        table.add_row("wall time", hms(doc["wall_s"]))
        if doc["engine_start_s"] is not None:
            table.add_row("engine start", f"{doc['engine_start_s']:.1f} s")
        table.add_row("speed", f"{doc['x_realtime']:.1f}× real time · {doc['windows_per_s']:.2f} windows/s")
        table.add_row("rows written", str(doc["rows_written"]))
        if doc["out"]:
            table.add_row("output", doc["out"])
        return table
