"""The command line: parses, builds a job, calls the pipeline. No logic of its own.

Heavy imports (pyarrow, librosa, torch, vLLM) happen inside the commands, so ``flamingo --help`` is
instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus, reap_children_on_exit, unblock_on_engine_death

app = typer.Typer(
    name="flamingo",
    help="Caption audio in bulk with Audio Flamingo 3 and Music Flamingo through vLLM, into Parquet.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_env = Environment()


class Fail(Exception):
    """Stop a command with a message and an exit status."""

    def __init__(self, status: ExitStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _version(value: bool) -> None:
    if value:
        _env.out.print(f"flamingo {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Caption audio in bulk with Audio Flamingo 3 and Music Flamingo through vLLM, into Parquet."""


# Options shared by caption and describe-music -------------------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", help="af3, mf, a hub id or a local checkpoint folder (default: the task's)."),
]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="Instruction text (overrides the task's).")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="Most tokens to generate per chunk.")]
TempOpt = Annotated[
    float | None, typer.Option("--temperature", help="0 = greedy, reproducible. Default: the checkpoint's.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (per chunk, independent of batching).")]
ChunkOpt = Annotated[
    float | None,
    typer.Option("--chunk-seconds", help="Split audio into chunks of this length (≤ model cap)."),
]
OverlapOpt = Annotated[float, typer.Option("--overlap", help="Seconds of overlap between fixed chunks.")]
GpuMemOpt = Annotated[float, typer.Option("--gpu-memory-utilization", help="Share of GPU memory vLLM may take.")]
TpOpt = Annotated[int, typer.Option("--tensor-parallel-size", help="GPUs to split one model replica across.")]
GpusOpt = Annotated[
    str,
    typer.Option(
        "--gpus",
        help="GPUs to use: all, none, or indexes like 0,1,3. One engine replica per GPU (per "
        "--tensor-parallel-size GPUs), all fed from one queue into one output.",
    ),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option("--replicas", help="Engine replicas (default: one per GPU group; 1 without GPUs)."),
]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="local (this host's GPUs) or ray (a Ray cluster through ray.data.llm; needs the 'ray' extra).",
    ),
]
RayAddressOpt = Annotated[
    str | None, typer.Option("--ray-address", help="With --executor ray: the cluster (default $RAY_ADDRESS or local).")
]
RayReplicasOpt = Annotated[
    str,
    typer.Option("--ray-replicas", help="With --executor ray: engine replicas, N or MIN,MAX to let Ray autoscale."),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        help="i/N (0-based): caption only this host's share of the inputs (by id hash); shards of one "
        "run write side by side into the same --out and resume independently.",
    ),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show vLLM's own logs.")]


def _job_settings(task: str, model: str | None, prompt: str | None):
    from flamingo_cli.config import ConfigError, load_preset
    from flamingo_cli.models import family_for, resolve_model_id

    try:
        preset = load_preset(task)
    except ConfigError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc
    model_id = resolve_model_id(model or preset.model)
    try:
        family = family_for(model_id)
    except ValueError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc
    return preset, model_id, family, prompt or preset.prompt


def _sampling(preset, max_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos=False, family=None):
    """Flags over the preset over the checkpoint (``max_tokens``: generation_config's max_new_tokens)."""
    from flamingo_cli.engine import Sampling

    s = dict(preset.sampling)
    overrides = dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    s.update({k: v for k, v in overrides.items() if v is not None})
    s["seed"] = seed
    s["ignore_eos"] = ignore_eos or s.get("ignore_eos", False)
    s.setdefault("max_tokens", (family.max_new_tokens if family is not None else None) or 512)
    return Sampling(**s)


def _engine_config(model_id, family, max_chunk_s, sampling, **kw):
    from flamingo_cli.engine import EngineConfig

    return EngineConfig(model=model_id, family=family, max_chunk_s=max_chunk_s, max_tokens=sampling.max_tokens, **kw)


def _start_engine(config):
    from flamingo_cli.engine import EngineError, get_engine

    try:
        return get_engine(config)
    except EngineError as exc:
        raise Fail(ExitStatus.ENGINE, str(exc)) from exc


def _signal_status(signum: int) -> ExitStatus:
    return ExitStatus.TERMINATED if signum == signal.SIGTERM else ExitStatus.INTERRUPTED


def _quit_now(signum: int) -> None:
    """Exit at once: ask vLLM's engine process to shut down, skip all Python cleanup.

    Safe for the output: parts are atomic (a half-written one stays in the hidden .tmp folder, removed
    on the next open), the run lock dies with the process, and rows not yet in a part are redone on
    resume.
    """
    import multiprocessing
    import os

    for child in multiprocessing.active_children():
        with contextlib.suppress(Exception):
            child.terminate()
    with contextlib.suppress(Exception):
        _env.stderr.flush()
    os._exit(int(_signal_status(signum)))


@contextlib.contextmanager
def _signals(stop: threading.Event, received: list[int], graceful: threading.Event):
    """SIGINT/SIGTERM while captioning: stop feeding, finish and flush what is done, exit 130/143.

    A second signal, or one while the engine is still starting (nothing to finish), exits at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.is_set() or not graceful.is_set():
            received.append(signum)
            _env.warn(f"{signal.Signals(signum).name}: quitting now; finished parts are kept")
            _quit_now(signum)
        received.append(signum)
        stop.set()
        _env.warn("stopping: finishing in-flight chunks and writing them (Ctrl-C again to quit now)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _closing(sink):
    """Close the sink (its last flush) on the way out; a failed last flush is exit 4, not a traceback."""
    from flamingo_cli.sink import OutputError

    try:
        yield sink
    except BaseException:
        with contextlib.suppress(OutputError):  # the first error is the one to report
            sink.close()
        raise
    try:
        sink.close()
    except OutputError as exc:
        raise Fail(ExitStatus.OUTPUT, f"{exc} (finished parts are kept; run the same command to resume)") from exc


def _report_console():
    """stdout for reports (dry-run, inspect, doctor): the terminal's width, or 160 columns in pipes and
    files instead of Rich's 80, so tables of paths and reasons stay readable in logs."""
    if _env.stdout_isatty:
        return _env.out
    from rich.console import Console

    return Console(file=_env.stdout, width=160, highlight=False, soft_wrap=False)


DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", help="Plan only (files, hours, chunks, tokens, GPU time) from headers; no model."),
]
LogFileOpt = Annotated[
    Path | None, typer.Option("--log-file", help="Append plain progress lines and the summary to this file.")
]
LogIntervalOpt = Annotated[
    float, typer.Option("--log-interval", help="Seconds between progress lines (off a terminal, and --log-file).")
]
SummaryJsonOpt = Annotated[
    Path | None, typer.Option("--summary-json", help="Write the end-of-run summary as JSON here (atomically).")
]


def _devices(gpus: str, tensor_parallel_size: int, replicas: int | None) -> tuple[str | None, ...]:
    from flamingo_cli.data_parallel import plan_replicas

    try:
        return tuple(plan_replicas(gpus, tensor_parallel_size, replicas))
    except ValueError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc


def _ray_settings(address: str | None, replicas: str):
    from flamingo_cli.ray_data import RaySettings

    try:
        parts = [int(x) for x in replicas.split(",")]
        if len(parts) not in (1, 2) or min(parts) < 1 or parts != sorted(parts):
            raise ValueError
    except ValueError as exc:
        raise Fail(ExitStatus.USAGE, f"--ray-replicas {replicas!r}: expected N or MIN,MAX (≥ 1)") from exc
    return RaySettings(address=address, num_replicas=parts[0] if len(parts) == 1 else (parts[0], parts[1]))


def _dry_run(items, family, model_id, task, chunk_s, overlap, workers, out, key, as_json) -> None:
    """caption --dry-run: plan from file headers; never loads a model (nor torch/vLLM)."""
    from flamingo_cli.plan import make_plan, render, render_problems, rows_on_disk

    status = None
    last = [0.0]
    if _env.stderr_isatty and not as_json:
        status = _env.err.status("planning: reading file headers …")
        status.start()

    def on_file(plan) -> None:
        now = time.monotonic()
        if status is not None and now - last[0] > 0.25:
            last[0] = now
            status.update(f"planning: {plan.files:,} files, {plan.duration_s / 3600:,.1f} h so far …")

    try:
        plan = make_plan(
            items,
            family,
            model=model_id,
            task=task,
            chunk_s=chunk_s,
            overlap_s=overlap,
            workers=workers,
            on_file=on_file,
        )
    finally:
        if status is not None:
            status.stop()
    plan.rows_on_disk = rows_on_disk(out, key)
    if as_json:
        doc = plan.as_dict()
        doc["run_key"] = key
        doc["out"] = str(out)
        _env.stdout.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
        _env.stdout.flush()
        return
    console = _report_console()
    console.print(render(plan, out))
    if plan.problems:
        console.print(render_problems(plan))


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Folders, audio files or manifests (txt/csv/tsv/jsonl/parquet).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (Parquet dataset).")],
    task: Annotated[str, typer.Option("--task", "-t", "--config", help="Task preset name or TOML path.")] = "caption",
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    chunk_seconds: ChunkOpt = None,
    overlap: OverlapOpt = 0.0,
    ext: Annotated[
        list[str] | None,
        typer.Option("--ext", help="Audio extensions to scan for (repeat or comma-separate)."),
    ] = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    repetition_penalty: Annotated[float | None, typer.Option("--repetition-penalty")] = None,
    seed: SeedOpt = 0,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Decode threads (default: 4 per engine replica, ≤ CPUs).")
    ] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run error rows again.")] = False,
    content_hash: Annotated[
        bool,
        typer.Option("--hash", help="Detect changed files by sha256 of their bytes instead of size + mtime."),
    ] = False,
    rows_per_part: Annotated[int, typer.Option("--rows-per-part", help="Rows per Parquet part file.")] = 1000,
    gpu_memory_utilization: GpuMemOpt = 0.9,
    tensor_parallel_size: TpOpt = 1,
    gpus: GpusOpt = "all",
    replicas: ReplicasOpt = None,
    shard: ShardOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_replicas: RayReplicasOpt = "1",
    dtype: DtypeOpt = "auto",
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs", help="vLLM batch size cap.")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option("--max-num-batched-tokens")] = None,
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs / compile.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", hidden=True)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
    log_file: LogFileOpt = None,
    log_interval: LogIntervalOpt = 30.0,
    summary_json: SummaryJsonOpt = None,
) -> None:
    """Caption every audio file under INPUTS and write Parquet parts to --out (resumable)."""
    from flamingo_cli.engine import EngineError
    from flamingo_cli.pipeline import CaptionJob, Stats, run_pipeline
    from flamingo_cli.progress import Progress
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.sink import LockedError, OutputError, Sink, run_key
    from flamingo_cli.sources import SourceError, check_inputs, iter_items, parse_shard, select_shard

    preset, model_id, family, prompt_text = _job_settings(task, model, prompt)
    try:
        shard_spec = parse_shard(shard) if shard else None
    except SourceError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc

    def items():
        found = iter_items(inputs, extensions)
        return select_shard(found, *shard_spec) if shard_spec else found

    sampling = _sampling(
        preset, max_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos, family=family
    )
    max_chunk_s = float(family.max_audio_s)
    if chunk_seconds is not None and not (0 < chunk_seconds <= family.max_audio_s):
        raise Fail(ExitStatus.USAGE, f"--chunk-seconds must be in (0, {family.max_audio_s}] for {family.name}")
    if chunk_seconds is not None and not (0 <= overlap < chunk_seconds):
        raise Fail(ExitStatus.USAGE, "--overlap must be ≥ 0 and shorter than --chunk-seconds")
    if chunk_seconds is None and overlap:
        raise Fail(ExitStatus.USAGE, "--overlap needs --chunk-seconds")
    extensions = [e for group in (ext or []) for e in group.split(",") if e.strip()] or None
    try:
        check_inputs(inputs)
    except SourceError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc

    identity = {
        "model": model_id,
        "task": preset.name,
        "prompt": prompt_text,
        "sampling": sampling.identity(),
        "chunk_seconds": chunk_seconds,
        "overlap": overlap,
    }
    key = run_key(identity)
    if dry_run:
        _dry_run(items(), family, model_id, preset.name, chunk_seconds, overlap, workers or 4, out, key, as_json)
        return
    if executor not in ("local", "ray"):
        raise Fail(ExitStatus.USAGE, f"--executor {executor!r}: expected local or ray")
    ray_settings = _ray_settings(ray_address, ray_replicas) if executor == "ray" else None
    devices = _devices(gpus, tensor_parallel_size, replicas) if executor == "local" else ()
    if workers is None:
        workers = max(4, min(4 * len(devices), os.cpu_count() or 4))
    run_info: dict[str, Any] = {"identity": identity, "argv": sys.argv[1:], "family": family.name}
    if shard_spec:
        run_info["shard"] = f"{shard_spec[0]}/{shard_spec[1]}"
    try:
        sink = Sink(
            out,
            key,
            run_info,
            model=model_id,
            task=preset.name,
            rows_per_part=rows_per_part,
            retry_failed=retry_failed,
            shard=shard_spec,
        )
    except OutputError as exc:  # checked before the model loads: a bad --out costs nothing
        raise Fail(ExitStatus.LOCKED if isinstance(exc, LockedError) else ExitStatus.USAGE, str(exc)) from exc

    stop = threading.Event()
    graceful = threading.Event()  # set once captioning runs: a first signal then stops cleanly
    received: list[int] = []
    with _closing(sink), _signals(stop, received, graceful):
        try:
            index = sink.load_index()
        except OutputError as exc:
            raise Fail(ExitStatus.OUTPUT, str(exc)) from exc
        if not quiet:
            _env.info(f"flamingo {__version__}: {family.name} {model_id}, task {preset.name}, run {key} → {out}")
            if len(index):
                _env.info(f"resuming: {len(index)} rows already written for this run")
        config = _engine_config(
            model_id,
            family,
            max_chunk_s,  # sized for the cap: one engine serves any --chunk-seconds
            sampling,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enforce_eager=enforce_eager,
            seed=seed,
            verbose=verbose,
            devices=devices,
        )
        progress = Progress(
            _env,
            model=model_id,
            task=preset.name,
            quiet=quiet,
            interval=log_interval,
            log_file=log_file,
            summary_json=summary_json,
            out=out,
            run_key=key,
        )
        engine = None
        if ray_settings is None:
            with progress.engine_start():
                engine = _start_engine(config)
            reap_children_on_exit()  # vLLM's processes die with this one, even on SIGKILL / OOM kill
            unblock_on_engine_death(engine)  # a dead engine process is exit 3, not a hang
            sink.run_info.update(
                {"versions": engine.versions, "sampling_effective": engine.effective_sampling(sampling)}
            )
        job = CaptionJob(
            inputs=list(inputs),
            prompts=PromptBuilder(family, load_chat_template(model_id)),
            prompt=prompt_text,
            max_chunk_s=max_chunk_s,
            sampling=sampling,
            chunk_s=chunk_seconds,
            overlap_s=overlap,
            extensions=extensions,
            workers=workers,
            retry_failed=retry_failed,
            content_hash=content_hash,
        )
        stats = Stats()
        progress.start(stats, inputs=list(inputs), extensions=extensions, shard=shard_spec)

        def tick() -> None:
            progress.tick()
            sink.flush_if_due()

        try:
            graceful.set()
            if ray_settings is not None:
                from flamingo_cli.ray_data import RayNotInstalledError, run_ray_pipeline

                try:
                    run_ray_pipeline(
                        job,
                        items(),
                        config,
                        progress.watch(sink, index, retry_failed),
                        stats,
                        index,
                        settings=ray_settings,
                        chat_template=job.prompts.chat_template,
                        on_tick=tick,
                        stop_event=stop,
                        run_info=sink.run_info,
                    )
                except RayNotInstalledError as exc:
                    raise Fail(ExitStatus.USAGE, str(exc)) from exc
            else:
                run_pipeline(
                    job,
                    items(),
                    engine,
                    progress.watch(sink, index, retry_failed),
                    stats,
                    index,
                    on_tick=tick,
                    stop_event=stop,
                )
        except EngineError as exc:
            if received:  # vLLM's engine process got the signal too (Ctrl-C, systemd stop) and quit
                raise Fail(_signal_status(received[0]), "stopped; finished rows are saved") from exc
            raise Fail(ExitStatus.ENGINE, f"{exc} (finished rows are saved; run the same command to resume)") from exc
        except OutputError as exc:
            raise Fail(ExitStatus.OUTPUT, f"{exc} (finished parts are kept; run the same command to resume)") from exc
        except KeyboardInterrupt as exc:
            raise Fail(ExitStatus.INTERRUPTED, "interrupted; finished rows are saved") from exc
        finally:
            progress.close()
            if engine is not None and (received or stop.is_set()):
                engine.abort_all()
    s = stats.snapshot()
    if received:
        progress.finish(_signal_status(received[0]))
    else:
        progress.finish(ExitStatus.ITEMS_FAILED if s["items_failed"] or s["chunks_failed"] else ExitStatus.OK)
    if received:
        raise Fail(_signal_status(received[0]), "stopped")
    if s["items_failed"] or s["chunks_failed"]:
        raise typer.Exit(ExitStatus.ITEMS_FAILED)


class _Collect:
    def __init__(self) -> None:
        self.results: list = []

    def write(self, result) -> None:
        self.results.append(result)


@app.command("describe-music")
def describe_music(
    track: Annotated[Path, typer.Argument(help="One audio file.")],
    model: ModelOpt = None,
    task: Annotated[str, typer.Option("--task", "-t", help="Task preset.")] = "describe-music",
    prompt: PromptOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None,
    seed: SeedOpt = 0,
    chunk_seconds: ChunkOpt = None,
    gpu_memory_utilization: GpuMemOpt = 0.9,
    tensor_parallel_size: TpOpt = 1,
    dtype: DtypeOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Describe one music track with Music Flamingo (long tracks: one section per chunk)."""
    from flamingo_cli.pipeline import CaptionJob, run_pipeline
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.records import AudioItem

    if not track.exists():
        raise Fail(ExitStatus.USAGE, f"{track}: file not found")
    if track.is_dir():
        raise Fail(
            ExitStatus.USAGE,
            f"{track}: is a directory (describe-music takes one file; use caption for folders)",
        )
    preset, model_id, family, prompt_text = _job_settings(task, model, prompt)
    sampling = _sampling(preset, max_tokens, temperature, None, None, None, seed, family=family)
    t0 = time.perf_counter()
    config = _engine_config(
        model_id,
        family,
        float(family.max_audio_s),
        sampling,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        seed=seed,
        verbose=verbose,
    )
    engine = _start_engine(config)
    job = CaptionJob(
        inputs=[str(track)],
        prompts=PromptBuilder(family, load_chat_template(model_id)),
        prompt=prompt_text,
        max_chunk_s=float(family.max_audio_s),
        sampling=sampling,
        chunk_s=chunk_seconds,
        workers=1,
    )
    sink = _Collect()
    t1 = time.perf_counter()
    item = AudioItem(id=track.name, path=str(track.resolve()), origin=str(track))
    run_pipeline(job, iter([item]), engine, sink)
    results = sorted(sink.results, key=lambda r: r.chunk.index)
    timing = {"engine_start_s": round(t1 - t0, 2), "generate_s": round(time.perf_counter() - t1, 2)}
    errors = [r.error for r in results if r.error]
    duration = next((r.chunk.duration_s for r in results if r.chunk.duration_s == r.chunk.duration_s), None)
    doc = {
        "path": str(track),
        "model": model_id,
        "task": preset.name,
        "prompt": prompt_text,
        "duration_s": duration,
        "sections": [
            {
                "chunk_index": r.chunk.index,
                "start_s": r.chunk.start_s if r.chunk.num_chunks else None,
                "end_s": r.chunk.end_s if r.chunk.num_chunks else None,
                "description": r.caption,
                "finish_reason": r.finish_reason,
                "output_tokens": r.output_tokens,
                "error": r.error,
            }
            for r in results
        ],
        "timing": timing,
        "flamingo_version": __version__,
    }
    if as_json:
        _env.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        _env.stdout.flush()
    else:
        _print_description(doc)
    if errors:
        if not as_json:
            for e in errors:
                _env.error(e)
        raise typer.Exit(ExitStatus.ITEMS_FAILED)


def _print_description(doc: dict[str, Any]) -> None:
    """Panels on a terminal; plain text (no box drawing, no truncation) in pipes and logs."""
    from rich.panel import Panel
    from rich.text import Text

    dur = doc["duration_s"]
    head = f"{doc['path']}  ·  {dur:.1f} s" if dur else doc["path"]
    sections = doc["sections"]
    if not _env.stdout_isatty:
        _env.stdout.write(head + (f"  ·  {len(sections)} parts" if len(sections) > 1 else "") + "\n")
    for s in sections:
        part = ""
        if len(sections) > 1 and s["start_s"] is not None:
            part = f"part {s['chunk_index'] + 1}/{len(sections)} ({s['start_s']:.0f}–{s['end_s']:.0f} s)"
        body = s["description"] if s["description"] is not None else f"error: {s['error']}"
        if _env.stdout_isatty:
            title = f"{head}  ·  {part}" if part else head
            _env.out.print(Panel(Text(body), title=title, title_align="left", expand=True))
        else:
            _env.stdout.write((f"\n[{part}]\n" if part else "\n") + body + "\n")
    t = doc["timing"]
    footer = (
        f"model {doc['model']} · task {doc['task']} · engine start {t['engine_start_s']} s · "
        f"generation {t['generate_s']} s"
    )
    if _env.stdout_isatty:
        _env.out.print(footer, style="dim")
    else:
        _env.stdout.write("\n" + footer + "\n")
        _env.stdout.flush()


@app.command()
def presets(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets as a JSON list.")] = False,
) -> None:
    """List the task presets with their models and prompts (use one with caption --task NAME or PATH)."""
    from rich.table import Table

    from flamingo_cli.config import ConfigError, list_presets

    if as_json:
        try:
            found = list_presets()
        except ConfigError as exc:
            raise Fail(ExitStatus.USAGE, str(exc)) from exc
        docs = [
            {
                "name": p.name,
                "model": p.model,
                "description": p.description,
                "prompt": p.prompt,
                "sampling": p.sampling,
                "file": p.source,
            }
            for p in found
        ]
        _env.stdout.write(json.dumps(docs, ensure_ascii=False) + "\n")
        _env.stdout.flush()
        return
    table = Table("task", "model", "prompt", "sampling", "file", show_lines=True)
    for p in list_presets():
        sampling = ", ".join(f"{k}={v}" for k, v in p.sampling.items())
        table.add_row(p.name, p.model, p.prompt, sampling, p.source)
    _env.out.print(table)


@app.command("inspect")
def inspect_cmd(
    out: Annotated[Path, typer.Argument(help="The --out folder of caption runs.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    samples: Annotated[int, typer.Option("--samples", help="Sample captions to show.")] = 3,
) -> None:
    """Summarise a result dataset: rows, items, errors by reason, audio hours, tokens, runs, samples."""
    from flamingo_cli.inspect import InspectError, inspect_output, render

    try:
        doc = inspect_output(out, samples=samples)
    except InspectError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc
    if as_json:
        _env.stdout.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
        _env.stdout.flush()
    else:
        render(doc, _report_console())


@app.command()
def doctor(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model(s) to check: af3, mf, a hub id or a folder (default: af3 and mf)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Check this machine: versions, GPUs, cached models, audio codecs. Exit 1 if a run would fail."""
    from flamingo_cli.doctor import as_json as checks_json
    from flamingo_cli.doctor import render, run_checks

    checks = run_checks(model or None)
    doc = checks_json(checks)
    if as_json:
        _env.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        _env.stdout.flush()
    else:
        render(checks, _report_console())
    raise typer.Exit(ExitStatus.OK if doc["ok"] else ExitStatus.ITEMS_FAILED)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo checkpoint, audio and output go.")] = Path(
        ".demo"
    ),
    kind: Annotated[str, typer.Option("--kind", help="af3 or mf.")] = "af3",
) -> None:
    """Smoke test on any machine: build a tiny RANDOM-WEIGHT model and sample audio, caption them.

    The captions are gibberish by design; this proves the install and the whole pipeline (decode,
    chunking, prompts, vLLM engine, Parquet, resume) work without any download.
    """
    import numpy as np
    import soundfile as sf

    from flamingo_cli.checkpoints import build_checkpoint

    ckpt = workdir / f"tiny-{kind}"
    if not (ckpt / "config.json").exists():
        _env.info(f"building a tiny random-weight {kind} checkpoint in {ckpt} …")
        build_checkpoint(kind, ckpt)
    audio_dir = workdir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, sr, seconds, channels in (
        ("tone-44k-stereo.flac", 44100, 12, 2),
        ("noise-16k.wav", 16000, 40, 1),
        ("chirp-22k.ogg", 22050, 7, 1),
    ):
        path = audio_dir / name
        if path.exists():
            continue
        t = np.arange(int(sr * seconds)) / sr
        x = 0.3 * np.sin(2 * np.pi * (220 + 40 * t) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr)
    out = workdir / "out"
    _env.info("NOTE: the demo model has RANDOM weights; its captions are meaningless smoke-test text.")
    status = main(
        [
            "caption",
            str(audio_dir),
            "--out",
            str(out),
            "--model",
            str(ckpt),
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "--task",
            "caption" if kind == "af3" else "describe-music",
        ],
        env=_env,
    )
    if status == 0:
        import pyarrow.dataset as ds

        table = ds.dataset(out, partitioning="hive").to_table(
            columns=["id", "chunk_index", "start_s", "end_s", "caption"]
        )
        _env.out.print(f"{table.num_rows} rows in {out} (random-model captions):")
        for row in table.sort_by([("id", "ascending"), ("chunk_index", "ascending")]).to_pylist():
            _env.out.print(f"  {row['id']} [{row['start_s']:.0f}–{row['end_s']:.0f} s]: {row['caption']!r}")
        _env.out.print("Real models on a GPU host: flamingo caption DIR --out OUT --model nvidia/audio-flamingo-3-hf")
    raise typer.Exit(status)


def main(argv: list[str] | None = None, env: Environment | None = None) -> int:
    """Run the CLI in-process; returns the exit status instead of exiting."""
    global _env
    previous = _env
    _env = env or Environment()
    try:
        try:
            # Without standalone mode click returns the code of a typer.Exit instead of raising it.
            rv = app(args=argv, prog_name="flamingo", standalone_mode=False)
            return int(rv) if isinstance(rv, int) else ExitStatus.OK
        except typer.Exit as exc:
            return int(exc.exit_code)
        except Fail as exc:
            if str(exc) != "stopped":
                _env.error(str(exc))
            return int(exc.status)
        except (typer.Abort, KeyboardInterrupt):
            _env.error("interrupted")
            return ExitStatus.INTERRUPTED
        except Exception as exc:  # click usage errors carry their own exit code
            import click

            if isinstance(exc, click.ClickException):
                exc.show(file=_env.stderr)
                return ExitStatus.USAGE
            raise
    finally:
        _env = previous
