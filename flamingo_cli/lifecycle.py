"""One run from open to summary, for every executor; signals.

validate → open the output (lock, resume index) → walk the inputs once → survey the front of that
walk against the index (nothing left: done, no engine; else how long the longest chunk is) → start
the engine sized by the survey → the executor (``pipeline.py`` locally, ``ray_data.py`` on Ray) takes
the items the survey looked at, then the rest of the same walk → flush → summary. Every exit after
the spec is valid writes the summary (``--summary-json``, the log's ``done`` line).

The walk: one thread reads the inputs into a bounded buffer (a million-file folder is never one list);
its counts give the display the files found so far, and the total once it has finished. The survey
fingerprints each item it looks at (``AudioItem.source``), so the executor does not stat it again.
Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.errors import EngineError, OutputError, Stopped, UsageError, exit_status
from flamingo_cli.spec import CaptionSpec
from flamingo_cli.summary import Summary, gpus_held
from flamingo_cli.tally import Tally

SURVEY_BUDGET_S = 20.0  # how long the survey may read headers to size the engine below the cap
SURVEY_KEEP = 10_000  # items the survey holds for the executor (work, error rows) before it stops looking
WALK_ITEMS = 50_000  # items the walk reads ahead of its consumer
WALK_BYTES = 256 << 20  # and bytes of embedded audio (dataset rows, tar members) it holds at most
NOTHING_TO_DO = "nothing to do"


# --- the walk ---------------------------------------------------------------------------------------


class InputWalk:
    """The run's one walk of its inputs: a thread reads the item stream ahead into a bounded buffer.

    Iterate it to take the items in order (an error of the walk is raised there). ``found`` counts the
    items read so far; ``total`` is set once the walk has read every input (None before, and after a
    walk that was closed or failed).
    """

    def __init__(self, items: Iterable[Any], max_items: int = WALK_ITEMS, max_bytes: int = WALK_BYTES) -> None:
        self._items = items
        self.max_items, self.max_bytes = max(1, max_items), max_bytes
        self._buffer: deque[Any] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._done = self._closed = False
        self._error: BaseException | None = None
        self.found = 0
        self.total: int | None = None
        self._thread = threading.Thread(target=self._walk, name="flamingo-walk", daemon=True)

    def start(self) -> InputWalk:
        self._thread.start()
        return self

    @staticmethod
    def _size(item: Any) -> int:
        data = getattr(item, "data", None)
        return len(data) if data is not None else 0

    def _walk(self) -> None:
        finished = False
        try:
            for item in self._items:
                size = self._size(item)
                with self._cond:
                    while (
                        self._buffer
                        and not self._closed
                        and (len(self._buffer) >= self.max_items or self._bytes + size > self.max_bytes)
                    ):
                        self._cond.wait()
                    if self._closed:
                        return
                    self._buffer.append(item)
                    self._bytes += size
                    self.found += 1
                    self._cond.notify_all()
            finished = True
        except BaseException as exc:  # raised where the items are taken
            self._error = exc
        finally:
            with contextlib.suppress(Exception):
                getattr(self._items, "close", lambda: None)()  # a stopped walk closes its open listings
            with self._cond:
                self._done = True
                if finished:
                    self.total = self.found
                self._cond.notify_all()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while not self._buffer and not self._done:
                self._cond.wait()
            if self._buffer:
                item = self._buffer.popleft()
                self._bytes -= self._size(item)
                self._cond.notify_all()
                return item
            error, self._error = self._error, None
        if error is not None:
            raise error
        raise StopIteration

    def close(self) -> None:
        """Stop reading ahead and drop what waits (the thread ends at its next item)."""
        with self._cond:
            self._closed = True
            self._buffer.clear()
            self._bytes = 0
            self._cond.notify_all()


# --- the survey -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Survey:
    """The look-ahead before the engine: is there work, and how long is the longest chunk of it."""

    todo: int = 0  # items that need the engine
    errors: int = 0  # items that only get an error row (missing file, bad manifest row)
    longest_chunk_s: float | None = None  # None: unknown, size the engine for the cap
    complete: bool = True  # every item was looked at
    seen: int = 0  # items looked at
    skipped: int = 0  # of those, already in the output (the counts a nothing-to-do run reports)
    kept: deque[Any] = dataclasses.field(default_factory=deque, repr=False)  # looked at, for the executor
    unique: Callable[[Any], Any] = dataclasses.field(default=lambda item: item, repr=False)

    def hand_on(self, rest: Iterable[Any]) -> Iterator[Any]:
        """The executor's items: those the survey kept (fingerprinted), then the rest of the same walk."""
        while self.kept:
            yield self.kept.popleft()
        for item in rest:
            yield self.unique(item)


def survey(
    spec: CaptionSpec,
    index: Any,
    budget_s: float = SURVEY_BUDGET_S,
    items: Iterator[Any] | None = None,
    size: bool = True,
) -> Survey:
    """Look at the front of ``items`` (default: a walk of ``spec``'s inputs) against the resume index,
    a stat per file, until the answer is known: nothing to do (every item looked at), or work and its
    longest chunk (stops at the model's cap, or after ``budget_s`` of reading headers: then the engine
    is sized for the cap). ``size=False`` (an engine not sized from the survey) stops at the first item
    with work. Items with work or an error row are kept, fingerprinted, for ``Survey.hand_on``; those
    already done are only counted."""
    from flamingo_cli.audio import probe_duration
    from flamingo_cli.chunking import chunk_spans
    from flamingo_cli.planner import Planner, Stats
    from flamingo_cli.resume import with_source

    job = spec.job()
    # Several tasks (``spec.more_tasks``): ``index`` is one resume index per task, and an item is work
    # when any task wants it.
    indexes = list(index) if spec.more_tasks else [index]
    planners = [Planner(t.job(), i, Stats()) for t, i in zip(spec.tasks, indexes, strict=True)]
    planner = planners[0]
    result = Survey(longest_chunk_s=0.0, unique=planner.unique)
    cap = spec.max_chunk_s
    first_todo: float | None = None
    for raw in spec.items() if items is None else items:
        item = with_source(planner.unique(raw), spec.content_hash)
        result.seen += 1
        if not any(p.decide(item, item.source).wanted for p in planners):
            result.skipped += 1
            continue
        result.kept.append(item)
        if item.error:
            result.errors += 1
            if len(result.kept) >= SURVEY_KEEP:  # that many error rows: let the executor write them
                result.complete = False
                break
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
        if (
            result.longest_chunk_s is None
            or result.longest_chunk_s >= cap
            or time.monotonic() - first_todo > budget_s
            or len(result.kept) >= SURVEY_KEEP
        ):
            result.complete = False
            break
    if not result.complete:
        result.longest_chunk_s = None
    return result


# --- what a run shows and leaves behind -------------------------------------------------------------


class Monitor:
    """One run's counts (``tally``), display (``display``, progress.py) and summary (``summary``);
    ``finish`` shows and writes the summary once, whatever the exit."""

    def __init__(
        self, env: Environment, *, quiet: bool = False, interval: float = 30.0, log_file: Path | None = None, **who: Any
    ) -> None:
        """``who``: the run's ``model``, ``task``, ``run_key``, ``out`` and ``summary_json`` (``summary.Summary``)."""
        from flamingo_cli.progress import Progress

        self.env = env
        self.tally = Tally()
        self.summary = s = Summary(self.tally, **who)
        self.display = Progress(
            env, self.tally.snapshot, s.model, task=s.task, quiet=quiet, interval=interval, log_file=log_file,
            run_key=s.run_key,
        )  # fmt: skip
        self._finished = False
        self.display.log("start", s.start_fields())

    def start(self, stats: Any, walk: Any = None, scan: Any = None) -> None:
        """Begin counting ``stats`` (and the ``walk``'s and ``scan``'s counts) and showing them."""
        self.tally.stats = stats
        self.tally.walk = walk if walk is not None else self.tally.walk
        self.tally.scan = scan if scan is not None else self.tally.scan
        self.display.start()

    def engine_ready(self, engine: Any) -> None:
        """The run's engine is ready (started, injected, or none needed): generation time counts from
        now; the GPUs it holds go into the summary."""
        self.tally.engine_ready = time.monotonic()
        self.summary.gpus = gpus_held(engine)

    def finish(self, status: int, error: str | None = None, reason: str | None = None, show: bool = True) -> dict:
        """The end-of-run summary: shown (table or line), logged, written to ``--summary-json``; once."""
        if self._finished:
            return {}
        self._finished = True
        self.summary.engine_start_s = self.display.engine_start_s
        doc = self.summary.document(status, error, reason)
        self.display.finish(doc, show)
        self.summary.write(doc, self.env.warn)
        return doc

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """An exception on its way out stops the display and records the run with its exit status."""
        try:
            yield
        except BaseException as exc:
            self.display.close()
            self.finish(int(exit_status(exc)), error=str(exc) or type(exc).__name__, show=False)
            raise


# --- the run ----------------------------------------------------------------------------------------


def run(
    spec: CaptionSpec,
    *,
    engine: Any = None,
    env: Environment | None = None,
    argv: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
) -> dict[str, Any]:
    """Run a validated spec; every exit after this point writes the summary. Returns the fields of the
    ``api.CaptionReport``."""
    from flamingo_cli.launch import refuse_to_rerun_in_a_spawned_child

    refuse_to_rerun_in_a_spawned_child("flamingo_cli.caption()")  # before the output is locked
    env = env or Environment()
    monitor = Monitor(
        env,
        model=spec.model,
        task=spec.task_names,
        quiet=spec.quiet,
        interval=spec.log_interval,
        log_file=Path(spec.log_file) if spec.log_file else None,
        summary_json=Path(spec.summary_json) if spec.summary_json else None,
        out=spec.out,  # a folder or an s3:// URL: Path() would fold "s3://" into "s3:/"
        run_key=spec.run_key,
    )
    with monitor.recording():
        return _Run(spec, env, monitor, engine, argv, stop_event).execute()


class _NoEngine:
    """The engine of a run whose survey found only error rows to write: never loads a model. A request
    that shows up anyway (a file appeared since the survey) is handed back as aborted: redone next run."""

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
        monitor: Monitor,
        engine: Any,
        argv: Sequence[str] | None,
        stop_event: threading.Event | None,
    ) -> None:
        self.spec, self.env, self.monitor, self.engine, self.argv = spec, env, monitor, engine, argv
        self.progress = monitor.display
        self.stop = stop_event or threading.Event()
        self.graceful = threading.Event()  # set once captioning runs: a first signal then stops cleanly
        self.received: list[int] = []

    def execute(self) -> dict[str, Any]:
        from flamingo_cli.errors import LockedError
        from flamingo_cli.manifests import declared_columns
        from flamingo_cli.planner import Stats
        from flamingo_cli.sink import Sink
        from flamingo_cli.sources import ScanStats

        spec, env, progress = self.spec, self.env, self.progress
        spec.check_inputs()
        for task in spec.tasks:
            for warning in task.check_schema():  # one vLLM cannot enforce: a usage error before the output opens
                env.warn(warning)
        sinks: list[Any] = []
        try:
            for task in spec.tasks:  # one sink (one run key, its own lock) per task
                sinks.append(
                    Sink(
                        task.out,  # a folder or an s3:// URL (never Path(): it would fold "s3://" into "s3:/")
                        task.run_key,
                        task.run_info(self.argv),
                        model=task.model,
                        task=task.task,
                        rows_per_part=task.rows_per_part,
                        retry_failed=task.retry_failed,
                        keep_silence=task.keep_silence,
                        shard=task.shard,
                        columns=declared_columns(task.inputs),
                        **task.sink_columns(),
                    )
                )
        except LockedError:
            _close_all(sinks)
            raise
        except OutputError as exc:  # found before the model loads: a bad --out costs nothing
            _close_all(sinks)
            raise UsageError(str(exc)) from exc
        if len(sinks) > 1:
            from flamingo_cli.pipeline import TaskRouter

            sink = TaskRouter(sinks)
        else:
            sink = sinks[0]
        stats = Stats()
        # The one walk of the inputs: the survey reads its front, the executor the rest; the files folder
        # scans pass over are counted once, for the sink (inspect) and the display.
        scan = ScanStats()
        sink.scan = self.monitor.tally.scan = scan
        walk = InputWalk(spec.items(scan))
        self.monitor.tally.walk = walk
        with _closing_all(sinks), self._signals(), contextlib.closing(walk):
            indexes = [s.load_index() for s in sinks]
            index = indexes[0]
            if not spec.quiet:
                runs = ", ".join(f"task {t.task}, run {t.run_key}" for t in spec.tasks)
                env.info(f"flamingo {__version__}: {spec.family.name} {spec.model}, {runs} → {spec.out}")
                for task, task_index in zip(spec.tasks, indexes, strict=True):
                    if len(task_index):
                        which = f" ({task.task})" if spec.more_tasks else ""
                        env.info(f"resuming{which}: {len(task_index)} rows already written for this run")
            if spec.executor == "ray":  # gates.py runs in the local executor only
                env.warn("--executor ray: no silence or duplicate gate and no audio measures (local executor only)")
            # Sizing below the cap pays on a GPU (vLLM's memory profile and encoder cache follow it); a CPU
            # engine's KV space is fixed, so it keeps the cap and one engine serves every run of a process.
            on_gpu = any(d is not None for d in spec.devices)
            found = survey(spec, indexes if spec.more_tasks else index, items=walk.start(), size=on_gpu)
            if not found.todo and not found.errors and found.complete:
                if not spec.quiet:
                    env.info(f"{NOTHING_TO_DO}: every input is already in {spec.out}")
                stats.items_seen, stats.items_skipped, stats.sources_exhausted = found.seen, found.skipped, True
                return self._report(sink, stats, ExitStatus.OK, reason=NOTHING_TO_DO)
            config = spec.engine_config(found.longest_chunk_s if on_gpu else None)
            engine = self._engine(config, needed=found.todo > 0 or not found.complete)
            self.monitor.engine_ready(engine)
            if engine is not None:
                for task, task_sink in zip(spec.tasks, sinks, strict=True):
                    task_sink.run_info.update(
                        {"versions": engine.versions, "sampling_effective": engine.effective_sampling(task.sampling)}
                    )
            template = self._chat_template()
            job = spec.job(template)
            # The survey's items already done are counted here; the executor counts every item it is handed.
            stats.items_seen, stats.items_skipped = found.skipped, found.skipped
            items = found.hand_on(walk)
            self.monitor.start(stats)

            def tick() -> None:
                progress.tick()
                sink.flush_if_due()

            try:
                self.graceful.set()
                watched = self.monitor.tally.watch(sink, index, spec.retry_failed)
                if spec.executor == "ray":
                    from flamingo_cli.ray_data import run_ray_pipeline

                    run_ray_pipeline(
                        job, items, config, watched, stats, index, settings=self._ray_settings(),
                        chat_template=job.prompts.chat_template, on_tick=tick, stop_event=self.stop,
                        run_info=sink.run_info,
                    )  # fmt: skip
                else:
                    from flamingo_cli.pipeline import TaskRun, run_pipeline
                    from flamingo_cli.tracks import read_chunk_rows

                    read_done = functools.partial(read_chunk_rows, spec.out, spec.run_key)
                    more = [
                        TaskRun(t.job(template), s, i, functools.partial(read_chunk_rows, t.out, t.run_key))
                        for t, s, i in zip(spec.more_tasks, sinks[1:], indexes[1:], strict=True)
                    ]
                    run_pipeline(
                        job, items, engine, watched, stats, index,
                        on_tick=tick, stop_event=self.stop, read_done=read_done, more_tasks=more,
                    )  # fmt: skip
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
            self.monitor.finish(int(Stopped(self.received[0]).status), reason="stopped; finished rows are saved")
            raise Stopped(self.received[0])
        failed = s["items_failed"] or s["chunks_failed"] or s["tracks_failed"]
        status = ExitStatus.ITEMS_FAILED if failed else ExitStatus.OK
        return self._report(sink, stats, status)

    def _report(self, sink: Any, stats: Any, status: ExitStatus, reason: str | None = None) -> dict[str, Any]:
        sinks = getattr(sink, "sinks", None) or [sink]  # a several-task run's TaskRouter: one per task
        tally = self.monitor.tally
        if tally.stats is None:
            tally.stats = stats
        if tally.watched is None:
            tally.watch(sink)
        if self.spec.more_tasks:  # several tasks: each one's run and rows
            self.monitor.summary.tasks = _tasks(self.spec, sinks)
        summary = self.monitor.finish(int(status), reason=reason)
        return {
            "status": status,
            "run_key": self.spec.run_key,
            "out": self.spec.out,
            "rows_written": int(getattr(sink, "rows_written", 0)),
            "stats": stats.snapshot(),
            "summary": summary,
            "run_dir": str(sink.run_dir),
            "info": dict(sink.run_info),
            "spec": self.spec,
            "tasks": summary.get("tasks") or _tasks(self.spec, sinks),
        }

    def _engine(self, config: Any, needed: bool) -> Any:
        """The injected engine, or vLLM started now (only when the survey found work for it)."""
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
            prepare = getattr(engine, "prepare", None)  # engine start includes readying it for these runs
            if prepare is not None:
                for task in self.spec.tasks:
                    prepare(task.sampling)
        reap_children_on_exit()  # vLLM's processes die with this one, even on SIGKILL / OOM kill
        return engine

    def _chat_template(self) -> str | None:
        from flamingo_cli.prompts import load_chat_template

        return load_chat_template(self.spec.model)

    def _ray_settings(self) -> Any:
        from flamingo_cli.ray_data import RaySettings

        spec = self.spec
        base = spec.ray_settings if spec.ray_settings is not None else RaySettings(address=spec.ray_address)
        return dataclasses.replace(base, address=spec.ray_address or base.address, num_replicas=spec.ray_replicas)

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


def _tasks(spec: CaptionSpec, sinks: Sequence[Any]) -> list[dict[str, Any]]:
    """Each task's run: its name, run key, rows written and folder (the summary's ``tasks``)."""
    return [
        {
            "task": task.task,
            "run_key": task.run_key,
            "rows_written": int(getattr(sink, "rows_written", 0)) + int(getattr(sink, "buffered", 0) or 0),
            "run_dir": str(sink.run_dir),
        }
        for task, sink in zip(spec.tasks, sinks, strict=True)
    ]


def _close_all(sinks: Sequence[Any]) -> None:
    for sink in sinks:
        with contextlib.suppress(OutputError):
            sink.close()


@contextlib.contextmanager
def _closing_all(sinks: Sequence[Any]) -> Iterator[None]:
    """Close every task's sink (its last flush) on the way out; the first error is the one reported."""
    # Nested ``_closing``s: a one-task run closes its one sink exactly as before.
    if not sinks:
        yield
        return
    with _closing(sinks[0]), _closing_all(sinks[1:]):
        yield


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


def early_summary(env: Environment, options: dict[str, Any], out: Any, exc: BaseException) -> None:
    """A bad option still leaves --summary-json / --log-file behind, so monitoring sees exit 2 too."""
    summary_json, log_file = options.get("summary_json"), options.get("log_file")
    if not summary_json and not log_file:
        return
    monitor = Monitor(
        env,
        model=str(options.get("model") or ""),
        task=_task_names(options.get("task") or options.get("tasks") or ""),
        quiet=True,
        log_file=Path(log_file) if log_file else None,
        summary_json=Path(summary_json) if summary_json else None,
        out=str(out),
    )
    monitor.finish(int(exit_status(exc)), error=str(exc), show=False)


def _task_names(value: Any) -> str:
    return "+".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
