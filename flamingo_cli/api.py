"""The Python API: the public functions. ``flamingo_cli.caption(...)`` is ``flamingo caption``.

Like img2dataset's ``download(**kwargs)``, the function is the product and the CLI a thin face over
it: ``caption(inputs, out, **options)`` takes the same options as ``flamingo caption`` (underscores for
dashes) and returns a ``CaptionReport``; a bad option raises ``SpecError`` (the CLI's exit 2), a
locked output ``LockedError`` (5), a dead engine ``EngineError`` (3), an unwritable output
``OutputError`` (4), a SIGINT/SIGTERM ``Stopped`` (130/143), all ``errors.FlamingoError``.
``describe`` is ``flamingo describe-music``; ``plan`` the dry run (``caption --dry-run``). The run
itself, for every executor, is ``lifecycle.py``'s. Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.errors import FlamingoError, UsageError
from flamingo_cli.lifecycle import NOTHING_TO_DO, early_summary, run
from flamingo_cli.spec import CaptionSpec


@dataclass
class CaptionReport:
    """What a caption run did (``summary`` is what ``--summary-json`` writes)."""

    status: ExitStatus
    run_key: str
    out: str
    rows_written: int
    stats: dict[str, Any]
    summary: dict[str, Any]
    run_dir: str = ""  # OUT/run=<run_key>: this run's parts
    info: dict[str, Any] = field(default_factory=dict)  # the run metadata stored with every part
    spec: CaptionSpec | None = field(default=None, repr=False)
    # One entry per task (``task``, ``run_key``, ``rows_written``, ``run_dir``): one in a one-task run.
    tasks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Some items or chunks failed (their error rows say why): the CLI's exit 1."""
        return self.status == ExitStatus.ITEMS_FAILED

    @property
    def nothing_to_do(self) -> bool:
        return self.summary.get("reason") == NOTHING_TO_DO


def caption(
    inputs: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    engine: Any = None,
    env: Environment | None = None,
    argv: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    **options: Any,
) -> CaptionReport:
    """Caption every audio file under ``inputs`` into ``out`` (Parquet; resumable, exactly once).

    ``options``: ``flamingo caption``'s options with underscores (``model``, ``task``, ``prompt``,
    ``temperature``, ``max_tokens``, ``chunk_seconds``, ``shard``, ``executor``, ``gpus``, ``quiet``, …).
    ``tasks=["caption", "audio-tags"]``: several tasks in one pass (each file decoded once, each chunk
    asked every task); each task writes the rows, under the run key, its one-task run would.
    ``engine``: an already started engine (``engine.Engine``) to use instead of starting vLLM.
    ``stop_event``: set it from another thread to stop like SIGTERM does (finish running requests).
    """
    env = env or Environment()
    try:
        spec = CaptionSpec.build(inputs, out, **options)
    except FlamingoError as exc:
        early_summary(env, options, out, exc)
        raise
    return CaptionReport(**run(spec, engine=engine or env.engine, env=env, argv=argv, stop_event=stop_event))


def plan(spec: CaptionSpec, on_file: Any = None) -> Any:
    """The dry run: files, hours, chunks, audio tokens and GPU time from headers; no model, no torch."""
    from flamingo_cli.plan import gated_on_disk, make_plan, rows_on_disk
    from flamingo_cli.sources import ScanStats

    spec.check_inputs()
    scan = ScanStats()
    result = make_plan(
        spec.items(scan),
        spec.family,
        model=spec.model,
        task=spec.task,
        chunk_s=spec.chunk_seconds,
        overlap_s=spec.overlap,
        workers=spec.workers or 4,
        on_file=on_file,
    )
    result.rows_on_disk = rows_on_disk(spec.out, spec.run_key)
    result.gated_on_disk = gated_on_disk(spec.out, spec.run_key)
    result.passed_over = scan.skipped()
    return result


def describe(path: str | Path, *, engine: Any = None, env: Environment | None = None, **options: Any) -> dict[str, Any]:
    """One track through the describe-music task: what ``flamingo describe-music --json`` prints."""
    from flamingo_cli.launch import get_engine, refuse_to_rerun_in_a_spawned_child
    from flamingo_cli.pipeline import run_pipeline
    from flamingo_cli.prompts import load_chat_template
    from flamingo_cli.records import TRACK_INDEX, AudioItem

    refuse_to_rerun_in_a_spawned_child("flamingo_cli.describe()")
    track = Path(path)
    if not track.exists():
        raise UsageError(f"{track}: file not found")
    if track.is_dir():
        raise UsageError(f"{track}: is a directory (describe-music takes one file; use caption for folders)")
    options.setdefault("task", "describe-music")
    options.setdefault("replicas", 1)  # one track: one engine
    spec = CaptionSpec.build([str(track)], "-", **options)
    env = env or Environment()
    t0 = time.perf_counter()
    for warning in spec.check_schema():  # a schema vLLM cannot enforce: a usage error before the model loads
        env.warn(warning)
    engine = engine or env.engine or get_engine(spec.engine_config())
    job = spec.job(load_chat_template(spec.model))
    job.workers = 1
    job.gates = None  # one track asked for by name: every section is described, silent or repeated
    sink = _Collect()
    t1 = time.perf_counter()
    item = AudioItem(id=track.name, path=str(track.resolve()), origin=str(track))
    run_pipeline(job, iter([item]), engine, sink)
    results = sorted(sink.results, key=lambda r: r.chunk.index)
    whole = [r for r in results if r.chunk.index == TRACK_INDEX]  # a long track's one description (tracks.py)
    results = [r for r in results if r.chunk.index != TRACK_INDEX]
    duration = next((r.chunk.duration_s for r in results if r.chunk.duration_s == r.chunk.duration_s), None)

    def section(r: Any) -> dict[str, Any]:
        return {
            "chunk_index": r.chunk.index,
            "start_s": r.chunk.start_s if r.chunk.num_chunks else None,
            "end_s": r.chunk.end_s if r.chunk.num_chunks else None,
            "description": r.caption,
            "reasoning": r.reasoning,
            "finish_reason": r.finish_reason,
            "output_tokens": r.output_tokens,
            "error": r.error,
            **({} if spec.json_schema is None else {"json": _parsed(spec.json_schema, r)}),
        }

    return {
        "path": str(track),
        "model": spec.model,
        "task": spec.task,
        "prompt": spec.prompt,
        "duration_s": duration,
        # The whole track's description, from its sections' (None for a track of one section).
        "track": section(whole[0]) if whole else None,
        "sections": [section(r) for r in results],
        "timing": {"engine_start_s": round(t1 - t0, 2), "generate_s": round(time.perf_counter() - t1, 2)},
        "flamingo_version": __version__,
    }


def _parsed(json_schema: Any, result: Any) -> Any:
    """A schema run's validated object for one section (None on error rows)."""
    import json

    text = json_schema.row_values(result)["caption_json"]
    return None if text is None else json.loads(text)


class _Collect:
    def __init__(self) -> None:
        self.results: list = []

    def write(self, result: Any) -> None:
        self.results.append(result)
