"""``flamingo caption --dry-run``: what a run would do, from file headers alone, without a model.

Streams the inputs (``sources.iter_items``), reads each file's duration from its header
(``audio.probe_duration``: libsndfile, else FFmpeg through PyAV; a thread pool, the GIL is released), cuts the same
chunks a real run would (``chunking.chunk_spans``) and counts audio tokens (``models.num_audio_tokens``)
and 30 s encoder windows. Only totals and a few example paths per problem are kept, so a million-row
manifest plans in constant memory. Never imports torch or vLLM.

Files whose header gives no duration (neither libsndfile nor FFmpeg can read it: corrupt
files) are counted as "no duration in header": a real run still tries to decode them or
records an error row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flamingo_cli.audio import probe_duration
from flamingo_cli.chunking import chunk_spans
from flamingo_cli.models import ModelFamily, num_audio_tokens, num_windows
from flamingo_cli.paths import escape_path
from flamingo_cli.records import SAMPLE_RATE, AudioItem

# Encoder windows (30 s of audio each) per second of GPU time, whole flamingo pipeline, one H100,
# full-size AF3 in bf16, 128 output tokens per request. measured: see BENCHMARKS.md (30.25 at
# max_num_batched_tokens 32768, 29.1 with vLLM's defaults; 29.5 is the round planning figure).
# Music Flamingo and AF-Next (all variants): not measured; they have the same 7B language model and
# the same audio encoder, so the AF3 rate is assumed. Longer outputs (captions up to 512-2048 tokens)
# take longer: an estimate only.
GPU_WINDOWS_PER_S: dict[str, float] = {"af3": 29.5, "mf": 29.5, "afnext": 29.5}  # by ModelFamily.family
GPU_RATE_SOURCE = "H100, full-size AF3, 128 output tokens per window (BENCHMARKS.md)"
EXAMPLES_PER_PROBLEM = 3


@dataclass
class Plan:
    """Totals for a dry run; JSON-ready with ``as_dict()``."""

    model: str
    family: str
    task: str
    max_chunk_s: float
    chunk_s: float | None
    overlap_s: float
    files: int = 0  # items the inputs yield (a manifest segment counts as one)
    readable: int = 0  # header read, duration known
    no_duration: int = 0  # soundfile could not read a duration (m4a/aac, corrupt, ...)
    source_errors: int = 0  # missing files, bad manifest rows, duplicates ...
    segment_errors: int = 0  # offset beyond the end of the file
    duration_s: float = 0.0
    chunks: int = 0
    too_short_chunks: int = 0
    windows: int = 0
    audio_tokens: int = 0
    longest_s: float = 0.0
    rows_on_disk: int = 0  # rows this run already wrote in OUT (resume skips finished items)
    # gates: silence and duplicates are found while decoding, so ``chunks`` counts every chunk as a request;
    # what the run's rows so far were gated as ({"silence": n, "duplicate": m}), from OUT
    gated_on_disk: dict[str, int] = field(default_factory=dict)
    gpu_windows_per_s: float = 0.0
    gpu_rate_source: str = GPU_RATE_SOURCE
    problems: dict[str, list[str]] = field(default_factory=dict)  # reason -> first example paths
    problem_counts: dict[str, int] = field(default_factory=dict)
    passed_over: dict[str, int] = field(default_factory=dict)  # files folder scans did not take, by extension

    @property
    def gpu_s(self) -> float:
        return self.windows / self.gpu_windows_per_s if self.gpu_windows_per_s else float("nan")

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["duration_h"] = self.duration_s / 3600
        doc["gpu_s"] = self.gpu_s
        doc["gpu_h"] = self.gpu_s / 3600
        return doc

    def _problem(self, reason: str, where: str) -> None:
        self.problem_counts[reason] = self.problem_counts.get(reason, 0) + 1
        examples = self.problems.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_PROBLEM:
            examples.append(escape_path(where))  # a name that is not UTF-8 must not break JSON or the table


def _segment_seconds(item: AudioItem, total: float) -> float | None:
    """Seconds a real run decodes for the item (its offset/duration within the file); None if beyond."""
    offset = float(item.offset or 0.0)
    if offset > 0 and offset >= total:
        return None
    seconds = total - offset
    if item.duration is not None:
        seconds = min(seconds, float(item.duration))
    return seconds


def _probe(item: AudioItem) -> float | None:
    return probe_duration(item)


def make_plan(
    items: Iterable[AudioItem],
    family: ModelFamily,
    *,
    model: str,
    task: str,
    chunk_s: float | None = None,
    overlap_s: float = 0.0,
    workers: int = 4,
    on_file: Callable[[Plan], None] | None = None,
) -> Plan:
    """Aggregate the plan over ``items`` (streamed; at most ``workers * 4`` header reads in flight)."""
    max_chunk_s = float(family.max_audio_s)
    plan = Plan(
        model=model,
        family=family.name,
        task=task,
        max_chunk_s=max_chunk_s,
        chunk_s=chunk_s,
        overlap_s=overlap_s,
        gpu_windows_per_s=GPU_WINDOWS_PER_S.get(family.family, 0.0),
    )

    def account(item: AudioItem, total: float | None) -> None:
        plan.files += 1
        if total is None:
            plan.no_duration += 1
            plan._problem("no duration in header (a corrupt file: decoding will likely fail)", item.path)
            return
        seconds = _segment_seconds(item, total)
        if seconds is None:
            plan.segment_errors += 1
            plan._problem("offset beyond the end of the file", f"{item.path} @ {item.offset} s")
            return
        plan.readable += 1
        plan.duration_s += seconds
        plan.longest_s = max(plan.longest_s, seconds)
        for start, end in chunk_spans(seconds, max_chunk_s, chunk_s, overlap_s).spans:
            n = round((end - start) * SAMPLE_RATE)
            tokens = num_audio_tokens(n)
            plan.chunks += 1
            if tokens == 0:
                plan.too_short_chunks += 1
                continue
            plan.audio_tokens += tokens
            plan.windows += num_windows(n)

    pending: deque[tuple[AudioItem, Future]] = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="flamingo-probe") as pool:
        for item in items:
            if item.error:
                plan.files += 1
                plan.source_errors += 1
                plan._problem(_reason_kind(item.error), item.path or item.origin)
                continue
            pending.append((item, pool.submit(_probe, item)))
            while len(pending) >= max(4, workers * 4) or (pending and pending[0][1].done()):
                done_item, fut = pending.popleft()
                account(done_item, fut.result())
                if on_file:
                    on_file(plan)
        while pending:
            done_item, fut = pending.popleft()
            account(done_item, fut.result())
            if on_file:
                on_file(plan)
    return plan


def _reason_kind(error: str) -> str:
    """A source error without its path: "file not found: /a/b.wav" -> "file not found"."""
    head = error.split(": /", 1)[0]
    return head if len(head) < 80 else head[:77] + "…"


def rows_on_disk(out: str | Path, run_key: str) -> int:
    """Rows already written under OUT/run=<key> (Parquet footers of its committed parts only)."""
    from flamingo_cli.errors import OutputError
    from flamingo_cli.output.layout import rows_on_disk as on_disk

    try:
        return on_disk(out, run_key)
    except OutputError:
        return 0


def gated_on_disk(out: str | Path, run_key: str) -> dict[str, int]:
    """Rows of run ``run_key`` in OUT the gates wrote without an engine request, by gate (its gate column
    only; superseded rows count too)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from flamingo_cli.errors import OutputError
    from flamingo_cli.output.layout import read_columns

    try:
        table = read_columns(out, run_key, pa.schema([("gate", pa.string())]))
    except (OSError, pa.ArrowException, OutputError):
        return {}
    if table is None or table.num_rows == 0:
        return {}
    counts = pc.value_counts(table["gate"].drop_null()).to_pylist()
    return {str(c["values"]): int(c["counts"]) for c in counts}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} h"


def render(plan: Plan, out: Path | None = None) -> Any:
    """A Rich table of the plan."""
    from rich.table import Table

    from flamingo_cli.summary import hms

    t = Table(title="flamingo caption --dry-run (no model loaded)", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    t.add_row("model", plan.model, f"{plan.family}, task {plan.task}")
    chunking = f"cap {plan.max_chunk_s:g} s" + (
        f", fixed {plan.chunk_s:g} s, overlap {plan.overlap_s:g} s" if plan.chunk_s else ", balanced"
    )
    t.add_row("files", f"{plan.files:,}", "items the inputs yield")
    t.add_row("readable", f"{plan.readable:,}", "duration read from the header")
    if plan.no_duration:
        t.add_row("no duration in header", f"{plan.no_duration:,}", "not audio, or corrupt: decoding will likely fail")
    if plan.source_errors:
        t.add_row("input errors", f"{plan.source_errors:,}", "missing files, bad manifest rows, duplicates")
    if plan.segment_errors:
        t.add_row("segment errors", f"{plan.segment_errors:,}", "offset beyond the end")
    t.add_row("audio", hours(plan.duration_s), f"longest {plan.longest_s:,.1f} s")
    t.add_row("chunks", f"{plan.chunks:,}", chunking)
    if plan.too_short_chunks:
        t.add_row("too short", f"{plan.too_short_chunks:,}", "chunks under 20 ms give no sound token: error rows")
    t.add_row("encoder windows", f"{plan.windows:,}", "30 s each")
    t.add_row("audio tokens", f"{plan.audio_tokens:,}", "750 per full window")
    gpu = "n/a" if plan.gpu_s != plan.gpu_s else (f"{plan.gpu_s:.1f} s" if plan.gpu_s < 60 else hms(plan.gpu_s))
    t.add_row("GPU time (estimate)", gpu, f"at {plan.gpu_windows_per_s:g} windows/s: {plan.gpu_rate_source}")
    if plan.rows_on_disk:
        t.add_row("already in output", f"{plan.rows_on_disk:,} rows", f"{out}: a real run resumes")
    gated = ", ".join(f"{n:,} {g}" for g, n in sorted(plan.gated_on_disk.items())) or "none yet"
    t.add_row("gates", "after decoding", f"silence and duplicates need no GPU; rows so far: {gated}")
    if plan.passed_over:
        from flamingo_cli.sources import describe_skipped

        n = sum(plan.passed_over.values())
        t.add_row("passed over", f"{n:,}", f"{describe_skipped(plan.passed_over)} (--ext all to try them)")
    return t


def render_problems(plan: Plan) -> Any:
    from rich.table import Table

    t = Table("problem", "count", "examples", title="problems", title_justify="left")
    for reason, examples in plan.problems.items():
        t.add_row(reason, f"{plan.problem_counts[reason]:,}", "\n".join(examples))
    return t
