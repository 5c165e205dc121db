"""The command line: Typer options → ``spec.CaptionSpec`` → ``api``; rendering. No logic of its own.

``main()`` is the one place that turns exceptions into exit codes (``errors.exit_status``), for
flamingo's own errors and for Typer's usage errors alike. Heavy imports (pyarrow, librosa, torch,
vLLM) happen inside the commands, so ``flamingo --help`` is instant.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flamingo_cli import __version__
from flamingo_cli.env import Environment, ExitStatus
from flamingo_cli.errors import FlamingoError, Stopped, exit_status, is_click_usage

app = typer.Typer(
    name="flamingo",
    help="Caption audio in bulk with the Audio Flamingo family (AF3, Music Flamingo, AF-Next) through vLLM, "
    "into Parquet.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_env = Environment()


class Fail(FlamingoError):
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
    """Caption audio in bulk with the Audio Flamingo family (AF3, Music Flamingo, AF-Next) through vLLM, into
    Parquet."""


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
    typer.Option(
        "--replicas",
        help="Engine replicas (default: one per GPU group; 1 without GPUs); a multiple of the GPU groups "
        "runs that many per group, memory split.",
    ),
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
SchemaOpt = Annotated[
    Path | None,
    typer.Option(
        "--schema",
        help="A JSON Schema file: generation is constrained to it; the JSON goes to caption_json and, for a "
        "flat schema, each field to a typed f_<field> column (overrides the task's schema).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show vLLM's own logs.")]
TrackPromptOpt = Annotated[
    str | None,
    typer.Option(
        "--track-prompt",
        help="Instruction of the track row a file cut into several chunks gets: one caption of the whole, "
        "made from the chunks' captions (overrides the task's).",
    ),
]
NoTrackOpt = Annotated[bool, typer.Option("--no-track-summary", help="No track row for files cut into several chunks.")]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quantization",
        help="fp8: quantise the language model's weights to FP8 at load (GPU; faster on Hopper, "
        "small quality cost, see PARITY.md). Off by default.",
    ),
]
KvCacheOpt = Annotated[
    str, typer.Option("--kv-cache-dtype", help="auto (the model dtype) or fp8: half the KV-cache memory.")
]
TrimOpt = Annotated[
    bool,
    typer.Option(
        "--trim-encoder/--no-trim-encoder",
        help="Run the audio encoder on each window's audio only, not its 30-s padding (exact; default).",
    ),
]


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

MelOpt = Annotated[
    str,
    typer.Option(
        "--mel-device",
        help="Where the log-mel features are computed: auto (the GPU when the engine runs on one), cpu, cuda.",
    ),
]
# confidence (issue 25b): docs/output.md, "Flags"
LogprobsOpt = Annotated[
    bool,
    typer.Option(
        "--logprobs/--no-logprobs",
        help="Ask vLLM for the sampled tokens' log-probabilities: the avg_logprob column and the "
        "low_confidence flag (off by default: ~20 % of throughput on an H100; not in the run key).",
    ),
]
FlagCrOpt = Annotated[
    float,
    typer.Option("--flag-compression-ratio", help="Flag 'repetition' above this compression ratio (Whisper: 2.4)."),
]
FlagLogprobOpt = Annotated[
    float, typer.Option("--flag-min-logprob", help="Flag 'low_confidence' below this avg_logprob (Whisper: -1.0).")
]
FallbackOpt = Annotated[
    bool,
    typer.Option(
        "--fallback",
        help="Ask flagged chunks again up a temperature ladder and keep the best attempt (attempts column).",
    ),
]
FallbackOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fallback-on", help="With --fallback: the flags that send a chunk back (repetition,low_confidence,empty)."
    ),
]
FallbackTempsOpt = Annotated[
    str | None,
    typer.Option("--fallback-temperatures", help="With --fallback: the ladder (0,0.2,0.4,0.6,0.8,1)."),
]
CpuKvOpt = Annotated[
    float, typer.Option("--cpu-kv-cache-gb", help="GiB of KV cache for vLLM's CPU backend (whole GiB, ≥ 1).")
]

# The gates (gates.py; docs/output.md "Gates")
KeepSilenceOpt = Annotated[
    bool,
    typer.Option("--keep-silence", help="Caption silent chunks too (a later run with it captions earlier gated ones)."),
]
SilencePeakOpt = Annotated[
    float, typer.Option("--silence-peak-db", help="A chunk whose peak is below this many dBFS is silent.")
]
SilenceActiveOpt = Annotated[
    float,
    typer.Option(
        "--silence-active-ratio",
        help="A chunk whose share of 20 ms frames at or above -50 dBFS RMS is at most this is silent.",
    ),
]
DedupeOpt = Annotated[
    bool,
    typer.Option(
        "--dedupe-audio/--no-dedupe-audio", help="Caption identical decoded audio once per run; the rest copy it."
    ),
]
VadOpt = Annotated[
    bool, typer.Option("--vad", help="Silero VAD per chunk: speech_ratio and speech_segments columns (CPU cost).")
]


def _report_console():
    """stdout for reports (dry-run, inspect, doctor): the terminal's width, or 160 columns in pipes and
    files instead of Rich's 80, so tables of paths and reasons stay readable in logs."""
    if _env.stdout_isatty:
        return _env.out
    from rich.console import Console

    return Console(file=_env.stdout, width=160, highlight=False, soft_wrap=False)


def _dry_run(spec: Any, as_json: bool) -> None:
    """caption --dry-run: plan from file headers; never loads a model (nor torch/vLLM)."""
    from flamingo_cli.api import plan
    from flamingo_cli.plan import render, render_problems

    status = None
    last = [0.0]
    if _env.stderr_isatty and not as_json:
        status = _env.err.status("planning: reading file headers …")
        status.start()

    def on_file(p: Any) -> None:
        now = time.monotonic()
        if status is not None and now - last[0] > 0.25:
            last[0] = now
            status.update(f"planning: {p.files:,} files, {p.duration_s / 3600:,.1f} h so far …")

    try:
        result = plan(spec, on_file=on_file)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        doc = {**result.as_dict(), "run_key": spec.run_key, "out": spec.out}
        _env.stdout.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
        _env.stdout.flush()
        return
    console = _report_console()
    console.print(render(result, Path(spec.out)))
    if result.problems:
        console.print(render_problems(result))


@app.command()
def caption(
    inputs: Annotated[list[str], typer.Argument(help="Folders, audio files or manifests (txt/csv/tsv/jsonl/parquet).")],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output folder (Parquet dataset): a local path or s3://bucket/prefix (object store)."
        ),
    ],
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            "-t",
            "--config",
            help="Task preset name or TOML path (default caption). Repeat for several tasks in one pass: "
            "each file decoded once, each chunk asked every task, one run key per task.",
        ),
    ] = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    chunk_seconds: ChunkOpt = None,
    overlap: OverlapOpt = 0.0,
    ext: Annotated[
        list[str] | None,
        typer.Option("--ext", help="Audio extensions to scan for (repeat or comma-separate); 'all' tries every file."),
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
    keep_silence: KeepSilenceOpt = False,
    silence_peak_db: SilencePeakOpt = -60.0,
    silence_active_ratio: SilenceActiveOpt = 0.0,
    dedupe_audio: DedupeOpt = True,
    vad: VadOpt = False,
    gpu_memory_utilization: GpuMemOpt = 0.9,
    tensor_parallel_size: TpOpt = 1,
    gpus: GpusOpt = "all",
    replicas: ReplicasOpt = None,
    shard: ShardOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_replicas: RayReplicasOpt = "1",
    dtype: DtypeOpt = "auto",
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs", help="vLLM batch cap (GPU: 512).")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option("--max-num-batched-tokens")] = None,
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs / compile.")] = False,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the language model. Default: not on a GPU (as fast, measured, and a shorter "
            "start; decode stays in CUDA graphs), vLLM's default (compile) on the CPU (docs/performance.md).",
        ),
    ] = None,
    quantization: QuantOpt = None,
    kv_cache_dtype: KvCacheOpt = "auto",
    trim_encoder: TrimOpt = True,
    mel_device: MelOpt = "auto",
    model_runner: Annotated[
        str,
        typer.Option(
            "--model-runner",
            help="vLLM's model runner: auto (flamingo's measured choice), v1, or v2 (Model Runner V2, "
            "a CUDA GPU only; docs/performance.md).",
        ),
    ] = "auto",
    cpu_kv_cache_gb: CpuKvOpt = 2.0,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", hidden=True)] = False,
    schema: SchemaOpt = None,
    track_prompt: TrackPromptOpt = None,
    no_track_summary: NoTrackOpt = False,
    logprobs: LogprobsOpt = False,
    flag_compression_ratio: FlagCrOpt = 2.4,
    flag_min_logprob: FlagLogprobOpt = -1.0,
    fallback: FallbackOpt = False,
    fallback_on: FallbackOnOpt = None,
    fallback_temperatures: FallbackTempsOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
    log_file: LogFileOpt = None,
    log_interval: LogIntervalOpt = 30.0,
    summary_json: SummaryJsonOpt = None,
) -> None:
    """Caption every audio file under INPUTS and write Parquet parts to --out (resumable)."""
    from flamingo_cli import api
    from flamingo_cli.spec import CaptionSpec

    options = {k: v for k, v in locals().items() if k not in ("inputs", "out", "dry_run", "as_json", "api")}
    options.pop("CaptionSpec", None)
    if dry_run:
        _dry_run(CaptionSpec.build(inputs, out, **options), as_json)
        return
    report = api.caption(inputs, out, env=_env, argv=sys.argv[1:], **options)
    raise typer.Exit(int(report.status))


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
    schema: SchemaOpt = None,
    track_prompt: TrackPromptOpt = None,
    no_track_summary: NoTrackOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Describe one music track with Music Flamingo (long tracks: one section per chunk)."""
    from flamingo_cli.api import describe

    options = {k: v for k, v in locals().items() if k not in ("track", "as_json", "describe")}
    doc = describe(track, env=_env, **options)
    if as_json:
        _env.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        _env.stdout.flush()
    else:
        _print_description(doc)
    errors = [s["error"] for s in [*doc["sections"], doc["track"] or {}] if s.get("error")]
    if errors and not as_json:
        for e in errors:
            _env.error(e)
    raise typer.Exit(ExitStatus.ITEMS_FAILED if errors else ExitStatus.OK)


def _print_description(doc: dict[str, Any]) -> None:
    """Panels on a terminal; plain text (no box drawing, no truncation) in pipes and logs."""
    from rich.panel import Panel
    from rich.text import Text

    dur = doc["duration_s"]
    head = f"{doc['path']}  ·  {dur:.1f} s" if dur else doc["path"]
    sections = doc["sections"]
    if not _env.stdout_isatty:
        _env.stdout.write(head + (f"  ·  {len(sections)} parts" if len(sections) > 1 else "") + "\n")
    whole = doc.get("track")
    if whole is not None:  # a long track: its one description first, then the sections
        body = whole["description"] if whole["description"] is not None else f"error: {whole['error']}"
        if _env.stdout_isatty:
            _env.out.print(Panel(Text(body), title=f"{head}  ·  whole track", title_align="left", expand=True))
        else:
            _env.stdout.write("\n[whole track]\n" + body + "\n")
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
                "schema": p.schema_source or None,
            }
            for p in found
        ]
        _env.stdout.write(json.dumps(docs, ensure_ascii=False) + "\n")
        _env.stdout.flush()
        return
    found = list_presets()
    if not _env.stdout_isatty:
        # A pipe or a file: one tab-separated line per preset, never wrapped or cut at 80 columns.
        lines = ["task\tmodel\tsampling\tfile\tprompt"]
        for p in found:
            sampling = ", ".join(f"{k}={v}" for k, v in p.sampling.items())
            prompt = p.prompt.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            lines.append("\t".join([p.name, p.model, sampling, str(p.source), prompt]))
        _plain_out(lines)
        return
    table = Table("task", "model", "prompt", "sampling", "file", show_lines=True)
    table.columns[4].overflow = "fold"  # a path to copy: folded, never cut with "…"
    for p in found:
        sampling = ", ".join(f"{k}={v}" for k, v in p.sampling.items())
        table.add_row(p.name, p.model, p.prompt, sampling, p.source)
    _env.out.print(table)


def _plain_out(lines: list[str]) -> None:
    """Lines meant to be read by programs or copied: written as they are (no Rich wrapping, no markup)."""
    _env.stdout.write("".join(line + "\n" for line in lines))
    _env.stdout.flush()


@app.command("inspect")
def inspect_cmd(
    out: Annotated[str, typer.Argument(help="The --out folder (or s3:// URL) of caption runs.")],
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


@app.command("export")
def export_cmd(
    out: Annotated[str, typer.Argument(help="The --out folder (or s3:// URL) of caption runs.")],
    to: Annotated[str, typer.Option("--to", help="Where to write: a file (parquet, jsonl) or a new folder (hf).")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="parquet, jsonl or hf (datasets.load_from_disk).")
    ] = "parquet",
    run: Annotated[str | None, typer.Option("--run", help="Only this run key (default: every run).")] = None,
    drop_flagged: Annotated[
        bool, typer.Option("--drop-flagged", help="Leave out rows with flags (repetition, empty, …; docs/output.md).")
    ] = False,
) -> None:
    """Write the current rows (one per chunk, superseded ones left out) and a real `run` column, for any reader."""
    from flamingo_cli.errors import OutputError
    from flamingo_cli.output.export import EXPORT_FORMATS, export
    from flamingo_cli.output.layout import runs

    if fmt not in EXPORT_FORMATS:
        raise Fail(ExitStatus.USAGE, f"--format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    try:
        keys = runs(out)
    except OutputError as exc:
        raise Fail(ExitStatus.USAGE, str(exc)) from exc
    if not keys or (run is not None and run not in keys):
        what = f"no run {run}" if run is not None else "no run=<key> folders"
        raise Fail(ExitStatus.USAGE, f"{out}: {what}: not a flamingo output (or nothing written yet)")
    try:
        rows = export(out, to, fmt, run=run, drop_flagged=drop_flagged)
    except OutputError as exc:
        raise Fail(ExitStatus.OUTPUT, str(exc)) from exc
    _env.info(f"{rows} current rows of {out} → {to} ({fmt})")


@app.command("browse")
def browse_cmd(
    out: Annotated[str, typer.Argument(help="The --out folder (or s3:// URL) of caption runs.")],
    to: Annotated[
        Path | None, typer.Option("--to", help="The report folder (default: OUT/_browse; ./browse-<name> for s3://).")
    ] = None,
    open_it: Annotated[bool, typer.Option("--open", help="Open the report in the default browser.")] = False,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the report and its audio on 127.0.0.1 (for an SSH tunnel).")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="The port of --serve (0: any free one).")] = 8765,
) -> None:
    """Write an offline HTML report: runs, plots, and every current row with a player for its chunk."""
    from flamingo_cli.browse import build_report

    report = build_report(out, to=to)
    _env.info(
        f"{report.rows:,} current rows in {report.pages:,} pages, {report.filters} filters, "
        f"{report.bytes / 1e6:,.1f} MB → {report.folder}"
    )
    _plain_out([report.url])
    if open_it:
        import webbrowser

        webbrowser.open(report.url)
    if serve:
        from flamingo_cli.browse import serve as serve_report

        def ready(url: str) -> None:
            p = url.rstrip("/").rsplit(":", 1)[1]
            _env.info(
                f"serving {report.folder} at {url} "
                f"(Ctrl-C stops; from another machine: ssh -L {p}:127.0.0.1:{p} <host>)"
            )

        serve_report(report.folder, port=port, on_ready=ready)


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
    from flamingo_cli.demo import run_demo

    raise typer.Exit(run_demo(workdir, kind, _env))


def main(argv: list[str] | None = None, env: Environment | None = None) -> int:
    """Run the CLI in-process; returns the exit status instead of exiting.

    The one place that maps failures to exit codes (``errors.exit_status``): flamingo's errors print one
    line; Typer's own usage errors (unknown flag, bad value, missing option, unknown command, no command)
    print one line and exit 2, never a traceback; a bug prints its traceback and exits 70.
    """
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
        except typer.Abort:
            _env.error("interrupted")
            return ExitStatus.INTERRUPTED
        except BaseException as exc:
            status = exit_status(exc)
            if isinstance(exc, Stopped):
                pass  # the signal handler already said so; the summary has it
            elif type(exc).__name__ == "NoArgsIsHelpError":  # a bare `flamingo`: the help, then one line
                ctx = getattr(exc, "ctx", None)
                if ctx is not None:
                    _env.stdout.write(ctx.get_help() + "\n")
                _env.error(f"no command given (see: {getattr(ctx, 'command_path', 'flamingo')} --help)")
            elif is_click_usage(exc):
                _env.error(_usage_line(exc))
            elif status == ExitStatus.INTERNAL:
                import traceback

                _env.stderr.write("".join(traceback.format_exception(exc)))
                _env.error(f"internal error (a bug in flamingo {__version__}): {type(exc).__name__}: {exc}")
            else:
                _env.error(str(exc) or type(exc).__name__)
            return int(status)
    finally:
        _env = previous


def _usage_line(exc: BaseException) -> str:
    """Typer/click's usage error in one line, with the command to ask for help."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "flamingo"
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)  # type: ignore[attr-defined]
    message = " ".join(message.split()) or "no command given"
    return f"{message} (see: {command} --help)"
