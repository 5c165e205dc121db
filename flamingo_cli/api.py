"""The Python API and the run lifecycle: ``flamingo_cli.caption(...)`` is ``flamingo caption``.

Like img2dataset's ``download(**kwargs)``, the function is the product and the CLI a thin face over
it: ``caption(inputs, out, **options)`` takes the same options as ``flamingo caption`` (underscores for
dashes) and returns a ``CaptionReport``; a bad option raises ``SpecError`` (the CLI's exit 2), a
locked output ``LockedError`` (5), a dead engine ``EngineError`` (3), an unwritable output
``OutputError`` (4), a SIGINT/SIGTERM ``Stopped`` (130/143), all ``errors.FlamingoError``.

One lifecycle for every executor: validate → open the output (lock, resume index) → plan against it
(nothing left: done, no engine) → start the engine sized by the plan → run the executor → flush →
summary. Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.errors import EngineError, FlamingoError, OutputError, Stopped, UsageError, exit_status
from flamingo_cli.spec import CaptionSpec

SCOUT_BUDGET_S = 20.0  # how long the pre-engine plan may read headers to size the engine below the cap


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

    @property
    def failed(self) -> bool:
        """Some items or chunks failed (their error rows say why): the CLI's exit 1."""
        return self.status == ExitStatus.ITEMS_FAILED

    @property
    def nothing_to_do(self) -> bool:
        return self.summary.get("reason") == NOTHING_TO_DO


NOTHING_TO_DO = "nothing to do"


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
    ``engine``: an already started engine (``engine.Engine``) to use instead of starting vLLM.
    ``stop_event``: set it from another thread to stop like SIGTERM does (finish running requests).
    """
    env = env or Environment()
    try:
        spec = CaptionSpec.build(inputs, out, **options)
    except FlamingoError as exc:
        _early_summary(env, options, out, exc)
        raise
    return run(spec, engine=engine or env.engine, env=env, argv=argv, stop_event=stop_event)


def run(
    spec: CaptionSpec,
    *,
    engine: Any = None,
    env: Environment | None = None,
    argv: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
) -> CaptionReport:
    """Run a validated spec; every exit after this point writes the summary (JSON, log file)."""
    from flamingo_cli.launch import refuse_to_rerun_in_a_spawned_child
    from flamingo_cli.progress import Progress

    refuse_to_rerun_in_a_spawned_child("flamingo_cli.caption()")
    env = env or Environment()
    progress = Progress(
        env,
        model=spec.model,
        task=spec.task,
        quiet=spec.quiet,
        interval=spec.log_interval,
        log_file=Path(spec.log_file) if spec.log_file else None,
        summary_json=Path(spec.summary_json) if spec.summary_json else None,
        out=spec.out,  # a folder or an s3:// URL: Path() would fold "s3://" into "s3:/"
        run_key=spec.run_key,
    )
    try:
        return _Run(spec, env, progress, engine, argv, stop_event).execute()
    except BaseException as exc:
        progress.close()
        progress.finish(int(exit_status(exc)), error=str(exc) or type(exc).__name__, show=False)
        raise


def plan(spec: CaptionSpec, on_file: Any = None) -> Any:
    """The dry run: files, hours, chunks, audio tokens and GPU time from headers; no model, no torch."""
    from flamingo_cli.plan import make_plan, rows_on_disk
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
    result.passed_over = scan.skipped()
    return result


def describe(path: str | Path, *, engine: Any = None, env: Environment | None = None, **options: Any) -> dict[str, Any]:
    """One track through the describe-music task: what ``flamingo describe-music --json`` prints."""
    from flamingo_cli.launch import get_engine, refuse_to_rerun_in_a_spawned_child
    from flamingo_cli.pipeline import run_pipeline
    from flamingo_cli.prompts import load_chat_template
    from flamingo_cli.records import AudioItem

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
    sink = _Collect()
    t1 = time.perf_counter()
    item = AudioItem(id=track.name, path=str(track.resolve()), origin=str(track))
    run_pipeline(job, iter([item]), engine, sink)
    results = sorted(sink.results, key=lambda r: r.chunk.index)
    duration = next((r.chunk.duration_s for r in results if r.chunk.duration_s == r.chunk.duration_s), None)
    return {
        "path": str(track),
        "model": spec.model,
        "task": spec.task,
        "prompt": spec.prompt,
        "duration_s": duration,
        "sections": [
            {
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
            for r in results
        ],
        "timing": {"engine_start_s": round(t1 - t0, 2), "generate_s": round(time.perf_counter() - t1, 2)},
        "flamingo_version": __version__,
    }


# --- the lifecycle --------------------------------------------------------------------------------------


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


@dataclass
class Scout:
    """The plan before the engine: is there work, and how long is the longest chunk of it."""

    todo: int = 0  # items that need the engine
    errors: int = 0  # items that only get an error row (missing file, bad manifest row)
    longest_chunk_s: float | None = None  # None: unknown, size the engine for the cap
    complete: bool = True  # every item was looked at
    seen: int = 0  # items looked at
    skipped: int = 0  # of those, already in the output (the counts a nothing-to-do run reports)


def scout(
    spec: CaptionSpec, index: Any, budget_s: float = SCOUT_BUDGET_S, scan: Any = None, size: bool = True
) -> Scout:
    """Walk the inputs against the resume index (a stat per file, as the run itself does) until the
    answer is known: nothing to do (every item looked at), or work and its longest chunk (stops at the
    model's cap, or after ``budget_s`` of reading headers: then the engine is sized for the cap).
    ``size=False`` (an engine that is not sized from the plan) stops at the first item with work."""
    from flamingo_cli.audio import probe_duration
    from flamingo_cli.chunking import chunk_spans
    from flamingo_cli.planner import Planner, Stats
    from flamingo_cli.resume import fingerprint

    job = spec.job()
    planner = Planner(job, index, Stats())
    result = Scout(longest_chunk_s=0.0)
    cap = spec.max_chunk_s
    first_todo: float | None = None
    for raw in spec.items(scan):
        item = planner.unique(raw)
        result.seen += 1
        if item.error:
            if planner.plan(item, None).wanted:
                result.errors += 1
            else:
                result.skipped += 1
            continue
        if not planner.plan(item, fingerprint(item, content_hash=spec.content_hash)).wanted:
            result.skipped += 1
            continue
        result.todo += 1
        if not size:
            result.complete = False
            break
        first_todo = first_todo or time.monotonic()
        seconds = float(item.duration) if item.duration is not None else probe_duration(item)
        if seconds is None or seconds <= 0:
            result.longest_chunk_s = None  # unknown length (a header that says nothing): size for the cap
        elif result.longest_chunk_s is not None:
            spans = chunk_spans(seconds, job.max_chunk_s, spec.chunk_seconds, spec.overlap).spans
            result.longest_chunk_s = max(result.longest_chunk_s, max((e - s for s, e in spans), default=0.0))
        if result.longest_chunk_s is None or result.longest_chunk_s >= cap or time.monotonic() - first_todo > budget_s:
            result.complete = False
            break
    if not result.complete:
        result.longest_chunk_s = None
    return result


class _NoEngine:
    """The engine of a run whose plan found only error rows to write: never loads a model. A request
    that shows up anyway (a file appeared since the plan) is handed back as aborted: redone next run."""

    versions: ClassVar[dict[str, str]] = {}

    def run(self, feed: Any, sampling: Any, on_step: Any = None) -> Iterator[Any]:
        from flamingo_cli.engine import END
        from flamingo_cli.records import Result

        while True:
            request = feed.get()
            if request is END:
                return
            yield Result(chunk=request.chunk, prompt=request.prompt, finish_reason="abort")

    def effective_sampling(self, sampling: Any) -> dict[str, Any]:
        return {}

    def abort_all(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _Run:
    """One caption run, from opening the output to the summary."""

    def __init__(
        self,
        spec: CaptionSpec,
        env: Environment,
        progress: Any,
        engine: Any,
        argv: Sequence[str] | None,
        stop_event: threading.Event | None,
    ) -> None:
        self.spec, self.env, self.progress, self.engine, self.argv = spec, env, progress, engine, argv
        self.stop = stop_event or threading.Event()
        self.graceful = threading.Event()  # set once captioning runs: a first signal then stops cleanly
        self.received: list[int] = []

    def execute(self) -> CaptionReport:
        from flamingo_cli.errors import LockedError
        from flamingo_cli.manifests import declared_columns
        from flamingo_cli.planner import Stats
        from flamingo_cli.sink import Sink
        from flamingo_cli.sources import ScanStats

        spec, env, progress = self.spec, self.env, self.progress
        spec.check_inputs()
        for warning in spec.check_schema():  # one vLLM cannot enforce: a usage error before the output opens
            env.warn(warning)
        try:
            sink = Sink(
                spec.out,  # a folder or an s3:// URL (never Path(): it would fold "s3://" into "s3:/")
                spec.run_key,
                spec.run_info(self.argv),
                model=spec.model,
                task=spec.task,
                rows_per_part=spec.rows_per_part,
                retry_failed=spec.retry_failed,
                shard=spec.shard,
                columns=declared_columns(spec.inputs),
                **spec.sink_columns(),
            )
        except LockedError:
            raise
        except OutputError as exc:  # found before the model loads: a bad --out costs nothing
            raise UsageError(str(exc)) from exc
        stats = Stats()
        # Files the folder scans pass over: the plan's walk counts them all when there is nothing to do,
        # the run's own walk otherwise; the sink records them for inspect, progress reports them.
        scouted, scan = ScanStats(), ScanStats()
        sink.scan = self.progress.scan = scouted
        with _closing(sink), self._signals():
            index = sink.load_index()
            if not spec.quiet:
                env.info(
                    f"flamingo {__version__}: {spec.family.name} {spec.model}, task {spec.task}, "
                    f"run {spec.run_key} → {spec.out}"
                )
                if len(index):
                    env.info(f"resuming: {len(index)} rows already written for this run")
            # Sizing below the cap pays on a GPU (vLLM's memory profile and encoder cache follow it); a CPU
            # engine's KV space is fixed, so it keeps the cap and one engine serves every run of a process.
            on_gpu = any(d is not None for d in spec.devices)
            found = scout(spec, index, scan=scouted, size=on_gpu)
            if not found.todo and not found.errors:
                if not spec.quiet:
                    env.info(f"{NOTHING_TO_DO}: every input is already in {spec.out}")
                stats.items_seen, stats.items_skipped, stats.sources_exhausted = found.seen, found.skipped, True
                return self._report(sink, stats, ExitStatus.OK, reason=NOTHING_TO_DO)
            config = spec.engine_config(found.longest_chunk_s if on_gpu else None)
            engine = self._engine(config, needed=found.todo > 0)
            if engine is not None:
                sink.run_info.update(
                    {"versions": engine.versions, "sampling_effective": engine.effective_sampling(spec.sampling)}
                )
            job = spec.job(self._chat_template())
            sink.scan = scan
            progress.start(stats, inputs=list(spec.inputs), extensions=spec.extensions, shard=spec.shard, scan=scan)

            def tick() -> None:
                progress.tick()
                sink.flush_if_due()

            try:
                self.graceful.set()
                watched = progress.watch(sink, index, spec.retry_failed)
                if spec.executor == "ray":
                    from flamingo_cli.ray_data import run_ray_pipeline

                    run_ray_pipeline(
                        job, spec.items(scan), config, watched, stats, index, settings=self._ray_settings(),
                        chat_template=job.prompts.chat_template, on_tick=tick, stop_event=self.stop,
                        run_info=sink.run_info,
                    )  # fmt: skip
                else:
                    from flamingo_cli.pipeline import run_pipeline

                    run_pipeline(
                        job, spec.items(scan), engine, watched, stats, index, on_tick=tick, stop_event=self.stop
                    )
            except EngineError as exc:
                if self.received:  # vLLM's engine process got the signal too (Ctrl-C, systemd stop) and quit
                    raise Stopped(self.received[0]) from exc
                raise EngineError(f"{exc} (finished rows are saved; run the same command to resume)") from exc
            except OutputError as exc:
                raise type(exc)(f"{exc} (finished parts are kept; run the same command to resume)") from exc
            except KeyboardInterrupt as exc:
                raise Stopped(signal.SIGINT, "interrupted; finished rows are saved") from exc
            finally:
                progress.close()
                if engine is not None and (self.received or self.stop.is_set()):
                    engine.abort_all()
        s = stats.snapshot()
        if self.received:
            progress.finish(int(Stopped(self.received[0]).status), reason="stopped; finished rows are saved")
            raise Stopped(self.received[0])
        status = ExitStatus.ITEMS_FAILED if s["items_failed"] or s["chunks_failed"] else ExitStatus.OK
        return self._report(sink, stats, status)

    def _report(self, sink: Any, stats: Any, status: ExitStatus, reason: str | None = None) -> CaptionReport:
        if self.progress.stats is None:
            self.progress.stats = stats
        if self.progress.watched is None:
            self.progress.watch(sink)
        summary = self.progress.finish(int(status), reason=reason)
        return CaptionReport(
            status=status,
            run_key=self.spec.run_key,
            out=self.spec.out,
            rows_written=int(getattr(sink, "rows_written", 0)),
            stats=stats.snapshot(),
            summary=summary,
            run_dir=str(sink.run_dir),
            info=dict(sink.run_info),
            spec=self.spec,
        )

    def _engine(self, config: Any, needed: bool) -> Any:
        """The injected engine, or vLLM started now (only when the plan found work for it)."""
        if self.spec.executor == "ray":
            return None
        if self.engine is not None:
            return self.engine
        if not needed:
            return _NoEngine()
        from flamingo_cli.env import reap_children_on_exit
        from flamingo_cli.launch import get_engine

        with self.progress.engine_start():
            engine = get_engine(config)
        reap_children_on_exit()  # vLLM's processes die with this one, even on SIGKILL / OOM kill
        return engine

    def _chat_template(self) -> str | None:
        from flamingo_cli.prompts import load_chat_template

        return load_chat_template(self.spec.model)

    def _ray_settings(self) -> Any:
        from dataclasses import replace

        from flamingo_cli.ray_data import RaySettings

        spec = self.spec
        base = spec.ray_settings if spec.ray_settings is not None else RaySettings(address=spec.ray_address)
        return replace(base, address=spec.ray_address or base.address, num_replicas=spec.ray_replicas)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM while captioning: stop feeding, drop what waits, finish what runs, write it,
        exit 130/143. A second signal, or one while the engine is still starting, exits at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            if self.stop.is_set() or not self.graceful.is_set():
                self.received.append(signum)
                self.env.warn(f"{signal.Signals(signum).name}: quitting now; finished parts are kept")
                _quit_now(self.env, signum)
            self.received.append(signum)
            self.stop.set()
            self.env.warn("stopping: finishing running requests and writing them (Ctrl-C again to quit now)")

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _quit_now(env: Environment, signum: int) -> None:
    """Exit at once: ask vLLM's engine processes to shut down, skip all Python cleanup.

    Safe for the output: parts are atomic (a half-written one stays in the hidden .tmp folder, removed
    on the next open), the run lock dies with the process, and rows not yet in a part are redone on
    resume.
    """
    import multiprocessing

    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.terminate()
    with contextlib.suppress(Exception):
        env.stderr.flush()
    os._exit(int(Stopped(signum).status))


@contextlib.contextmanager
def _closing(sink: Any) -> Iterator[Any]:
    """Close the sink (its last flush) on the way out; the first error is the one reported."""
    try:
        yield sink
    except BaseException:
        with contextlib.suppress(OutputError):
            sink.close()
        raise
    try:
        sink.close()
    except OutputError as exc:
        raise type(exc)(f"{exc} (finished parts are kept; run the same command to resume)") from exc


def _early_summary(env: Environment, options: dict[str, Any], out: Any, exc: BaseException) -> None:
    """A bad option still leaves --summary-json / --log-file behind, so monitoring sees exit 2 too."""
    from flamingo_cli.progress import Progress

    summary_json, log_file = options.get("summary_json"), options.get("log_file")
    if not summary_json and not log_file:
        return
    progress = Progress(
        env,
        model=str(options.get("model") or ""),
        task=str(options.get("task") or ""),
        quiet=True,
        log_file=Path(log_file) if log_file else None,
        summary_json=Path(summary_json) if summary_json else None,
        out=str(out),
    )
    progress.finish(int(exit_status(exc)), error=str(exc), show=False)


# --- the Ray executor's older entry point ---------------------------------------------------------------


@dataclass
class RayRun:
    """What ``caption_with_ray`` did: the run key, its folder and the counters."""

    run_key: str
    run_dir: Path
    stats: Any
    rows_written: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        s = self.stats
        return bool(s.items_failed or s.chunks_failed)


def caption_with_ray(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    sampling: Any = None,
    settings: Any = None,
    chunk_s: float | None = None,
    overlap_s: float | None = None,
    extensions: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    **options: Any,
) -> RayRun:
    """``caption(inputs, out, executor="ray", ...)`` with ``ray_data``'s older keywords.

    ``sampling`` values override the preset's like the CLI's flags (they used to replace it, which gave
    the same settings another run key); ``chunk_s``/``overlap_s``/``extensions`` are ``chunk_seconds``/
    ``overlap``/``ext``. Everything else is ``flamingo_cli.caption``'s options.
    """
    if sampling is not None:
        for name, value in sampling.identity().items():
            if value is not None:
                options.setdefault(name, value)
    options.setdefault("quiet", True)
    report = caption(
        inputs,
        out,
        executor="ray",
        ray_settings=settings,
        ray_replicas=(settings.num_replicas if settings is not None else 1),
        ray_address=(settings.address if settings is not None else None),
        chunk_seconds=chunk_s,
        overlap=overlap_s,
        ext=list(extensions) if extensions is not None else None,
        stop_event=stop_event,
        **options,
    )
    from flamingo_cli.planner import Stats

    stats = Stats(**{k: v for k, v in report.stats.items() if k != "started"})
    return RayRun(
        run_key=report.run_key,
        run_dir=Path(report.run_dir),
        stats=stats,
        rows_written=report.rows_written,
        info=report.info,
    )
