"""The summary document of one run: what ``--summary-json`` writes and the log's ``start``/``done`` lines say.

Built from the run's counts (``tally.Tally``) once the outcome is known, for every exit (a finished run,
an error, a signal, a bad option), so monitoring sees failed runs too. ``write_json_atomic`` never
leaves a half-written file. Drawing the document (a table on a terminal, the ``done:`` line off one)
is ``progress.py``'s; the fields and their wording are here.

Two clocks: ``processing_s`` (and ``x_realtime``, ``windows_per_s``) run from the executor's counters'
start, engine start included; ``generation_s`` runs from the engine being ready to its last result,
and the ``*_per_generation_s`` rates and ``audio_hours_per_gpu_hour`` divide by it (docs/cron.md,
"Throughput").
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flamingo_cli import __version__
from flamingo_cli.env import ExitStatus

UNKNOWN = "…"

STATUS_NAMES = {
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


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def passed_over_field(counts: dict[str, int]) -> str:
    """Files passed over as one log field: `` passed_over=11(.xyz:8,.txt:3)`` (no spaces: key=value lines)."""
    if not counts:
        return ""
    kinds = ",".join(f"{ext.replace(' ', '_')}:{n}" for ext, n in counts.items())
    return f" passed_over={sum(counts.values())}({kinds})"


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON to ``path`` via a temp file in the same folder and ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # backslashreplace: an error quoting a name that is not UTF-8 must not lose the summary.
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            json.dump(doc, f, indent=2, sort_keys=True, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# The timing fields the ``done:`` line carries as they are in the document (null when unknown).
TIMING_FIELDS = (
    "engine_start_s",
    "time_to_first_row_s",
    "generation_s",
    "rows_per_generation_s",
    "windows_per_generation_s",
    "audio_s_per_generation_s",
    "gpus",
    "audio_hours_per_gpu_hour",
)


def gpus_held(engine: Any) -> int | None:
    """How many GPUs ``engine`` runs on, from its config's ``devices`` (one ``CUDA_VISIBLE_DEVICES``
    entry per replica, "0,1" for a tensor-parallel pair; replicas sharing a GPU count it once): 0 on
    CPU (entries None), None when unknown (no config or no devices: an injected engine that does not
    say, no engine, ``--executor ray``)."""
    devices = getattr(getattr(engine, "config", None), "devices", None)
    if not devices:
        return None
    return len({g.strip() for d in devices if d for g in str(d).split(",") if g.strip()})


def summary_line(doc: dict[str, Any]) -> str:
    """The ``done:`` line (stderr off a terminal; the log file's last line without the prefix)."""
    timing = " ".join(f"{k}={json.dumps(doc.get(k))}" for k in TIMING_FIELDS)
    return (
        f"done: status={doc['status']} files_ok={doc['files_ok']} files_failed={doc['files_failed']} "
        f"files_skipped={doc['files_skipped']} chunks_ok={doc['chunks_ok']} chunks_failed={doc['chunks_failed']} "
        f"{_gated_fields(doc)}"
        f"audio_h={doc['audio_hours']:.3f} wall={hms(doc['wall_s'])} processing_s={doc['processing_s']:.1f} "
        f"x_rt={doc['x_realtime']:.1f} {timing} rows={doc['rows_written']} out={doc['out']}"
        f"{passed_over_field(doc.get('files_passed_over_by_ext') or {})}"
    ) + (f" reason={json.dumps(doc['reason'], ensure_ascii=False)}" if doc.get("reason") else "")


def _gated_fields(doc: dict[str, Any]) -> str:
    """The gates' counts on the done line, when it has any: chunks written without an engine request."""
    if not (doc.get("chunks_silent") or doc.get("chunks_duplicate")):
        return ""
    return (
        f"chunks_silent={doc['chunks_silent']} chunks_duplicate={doc['chunks_duplicate']} "
        f"requests_sent={doc['requests_sent']} "
    )


def status_name(status: int) -> str:
    try:
        return STATUS_NAMES.get(ExitStatus(status), str(status))
    except ValueError:
        return str(status)


class Summary:
    """One run's summary: who ran what where (fixed at the start), the numbers at the end.

    ``tally`` (a ``tally.Tally``) gives the numbers, the moments and the sink; ``engine_start_s`` is set
    by whoever started the engine (None: this run started none), ``gpus`` (``gpus_held``) once the
    engine is ready. ``document`` builds the dict, ``write`` puts it in ``--summary-json``.
    """

    def __init__(
        self,
        tally: Any,
        *,
        model: str = "",
        task: str = "",
        run_key: str = "",
        out: str | Path | None = None,
        summary_json: Path | None = None,
    ) -> None:
        self.tally = tally
        self.model, self.task, self.run_key, self.out = model, task, run_key, out
        self.summary_json = Path(summary_json) if summary_json else None
        self.engine_start_s: float | None = None
        self.gpus: int | None = None
        # Several tasks in one pass: each one's task, run_key, rows_written, run_dir (None: one task)
        self.tasks: list[dict[str, Any]] | None = None
        self.created = time.monotonic()  # the run's start: wall_s and time_to_first_row_s count from here
        self.started_at = now_iso()

    def start_fields(self) -> dict[str, Any]:
        """The log's ``start`` line."""
        return {"flamingo": __version__, "model": self.model, "task": self.task, "run": self.run_key, "out": self.out}

    def document(self, status: int, error: str | None = None, reason: str | None = None) -> dict[str, Any]:
        p = self.tally.snapshot()
        counting = self.tally.stats is not None
        watched = self.tally.watched
        sink = watched.sink if watched is not None else None
        rows = parts = None
        if sink is not None:
            rows = int(getattr(sink, "rows_written", 0)) + int(getattr(sink, "buffered", 0) or 0)
            parts = getattr(sink, "parts_written", None)
        first_row = watched.first_row_at if watched is not None else None
        engine_start = None if self.engine_start_s is None else round(self.engine_start_s, 3)
        # Rates over the rounded generation_s, so that a reader dividing the document's numbers gets them.
        generation = round(self.tally.generation_s(), 3)

        def per_generation_s(amount: float) -> float:
            return round(amount / generation, 4) if generation > 0 else 0.0

        gpu_hours = ((engine_start or 0.0) + generation) * (self.gpus or 0) / 3600
        return {
            "status": status_name(status),
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
            "finished_at": now_iso(),
            "wall_s": round(time.monotonic() - self.created, 3),
            "engine_start_s": engine_start,
            "processing_s": round(p["elapsed_s"], 3) if counting else 0.0,
            # from the run's start to the first row the sink accepted (None: no row)
            "time_to_first_row_s": None if first_row is None else round(first_row - self.created, 3),
            # from the engine being ready (after its start) to its last result (0.0: nothing generated)
            "generation_s": generation,
            "rows_per_generation_s": per_generation_s(rows or 0),
            "windows_per_generation_s": per_generation_s(p["windows_done"]),
            "audio_s_per_generation_s": per_generation_s(p["audio_s_done"]),  # the real-time factor
            "gpus": self.gpus,  # GPUs the run's engine(s) hold; 0 on CPU, None unknown
            # audio hours ÷ ((engine_start_s + generation_s) × gpus / 3600); None without GPUs
            "audio_hours_per_gpu_hour": round(p["audio_s_done"] / 3600 / gpu_hours, 4) if gpu_hours > 0 else None,
            "files_seen": p["files_seen"],
            "files_ok": p["files_ok"],
            "files_failed": p["files_failed"],
            "files_skipped": p["files_skipped"],
            "chunks_ok": p["chunks_ok"],
            "chunks_failed": p["chunks_failed"],
            "chunks_dropped": p["chunks_dropped"],
            "files_changed": p["files_changed"],
            # gates: chunks written without an engine request, and the requests the engine was sent
            "chunks_silent": p["chunks_silent"],
            "chunks_duplicate": p["chunks_duplicate"],
            "requests_sent": p["requests_sent"],
            "audio_hours": round(p["audio_s_done"] / 3600, 6),
            "x_realtime": round(p["x_realtime"], 3) if counting else 0.0,
            "windows": p["windows_done"],
            "windows_per_s": round(p["windows_per_s"], 4) if counting else 0.0,
            "prompt_tokens": p["prompt_tokens"],
            "output_tokens": p["output_tokens"],
            "rows_written": rows,
            "parts_written": parts,
            # Files folder scans passed over (extension not taken), by extension: {".xyz": 8, ".txt": 3}.
            "files_passed_over": sum(p["passed_over_by_ext"].values()),
            "files_passed_over_by_ext": p["passed_over_by_ext"],
            # confidence (issue 25b; docs/cron.md, "Flags"): rows written with flags, per reason, and
            # --fallback's counts (chunks asked again, re-asks, chunks recovered)
            "rows_flagged": p["rows_flagged"],
            "flags": p["flags"],
            "fallback": p["fallback"],
            **({"tasks": self.tasks} if self.tasks is not None else {}),
        }

    def write(self, doc: dict[str, Any], warn: Any) -> None:
        """``--summary-json``, atomically; a failure to write is a warning, never the run's error."""
        if self.summary_json is None:
            return
        try:
            write_json_atomic(self.summary_json, doc)
        except OSError as exc:
            warn(f"{self.summary_json}: cannot write the summary ({exc.strerror or exc})")
