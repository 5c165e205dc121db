"""Many hosts: caption through Ray Data, vLLM driven by ``ray.data.llm``, into the same Parquet.

``flamingo caption`` runs one engine in one process. On a Ray cluster this module spreads the same work
over every node, dynamically: flamingo's own stages (decode, chunking, prompts) run as Ray tasks,
vLLM engine replicas run as Ray actors through ``ray.data.llm`` (``vLLMEngineProcessorConfig`` +
``build_processor``, audio passed as ``multi_modal_data``), and the driver consumes the result stream
and writes it through ``sink.Sink``: the same schema, run key, lock, atomic parts and exactly-once
resume as ``flamingo caption``.

    driver      sources.iter_items -> decide each item against the ResumeIndex (skip / finish / redo)
    Ray tasks   prepare.prepare: audio.decode -> chunking.chunk_audio -> prompts   (one row per chunk)
    Ray actors  vLLM (AsyncLLM) through ray.data.llm; N replicas, each on its own GPU(s) or CPUs
    driver      rows -> Results -> Sink.write (begin_item first: source fingerprint and version)

Rows that failed before the engine (decode errors, chunks too short for a sound token) carry
ray.data.llm's per-row error marker ``__inference_error__``, which makes every processor stage pass them
through untouched; the engine's own per-row failures come back the same way
(``should_continue_on_error``), so one bad file or request never fails the job.

Deciding is a pass over all inputs in the driver before Ray starts (``ray.data.from_items`` needs the
list): a stat per file, or a sha256 with ``content_hash``. Ray and vLLM are imported only when a run
starts; workers on other hosts need flamingo, Ray and vLLM installed (or a ``runtime_env``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import numpy as np

from flamingo_cli.engine import (
    EngineConfig,
    EngineError,
    Sampling,
    effective_sampling,
    engine_versions,
    request_seed,
    sampling_kwargs,
)
from flamingo_cli.fallback import Ladder
from flamingo_cli.models import FAMILIES
from flamingo_cli.planner import CaptionJob, Planner, ResultSink, Stats
from flamingo_cli.prepare import prepare
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.quiet import QUIET_ENV, quiet_env
from flamingo_cli.reasoning import with_reasoning
from flamingo_cli.records import SAMPLE_RATE, AudioItem, Chunk, Fingerprint, Result, error_result
from flamingo_cli.resume import ResumeIndex, with_source
from flamingo_cli.schema import output_check
from flamingo_cli.vllm_args import engine_env, engine_kwargs

# ray.data.llm's per-row error column: a row with it set skips every stage and its postprocess.
ERROR_COLUMN = "__inference_error__"
# The sampling parameters vLLM takes from a checkpoint's generation_config.json (ModelConfig's list).
_GENERATION_PARAMS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
# What a prepared row carries besides the LLM inputs; the driver maps it back onto a Chunk.
_CHUNK_KEYS = ("seq", "todo", "chunk_index", "num_chunks", "start_s", "end_s", "duration_s", "error")


class RayNotInstalledError(RuntimeError):
    """The Ray Data path was asked for but Ray is not installed (the ``ray`` extra)."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide the work runs on the Ray cluster."""

    # ray.init(address=...): None = $RAY_ADDRESS or a new local cluster; "auto" = the cluster this host
    # belongs to; "ray://head:10001" = Ray Client. Ignored when Ray is already initialised.
    address: str | None = None
    # vLLM engine replicas (Ray actors); a (min, max) pair lets Ray Data autoscale the pool.
    num_replicas: int | tuple[int, int] = 1
    batch_size: int = 16  # rows per engine call
    max_concurrent_batches: int = 8  # calls in flight per replica, so vLLM's running batch stays full
    use_gpu: bool | None = None  # None: GPU replicas if the cluster has GPUs, else CPU replicas
    cpus_per_replica: float = 1.0  # CPU replicas only
    decode_cpus: float = 1.0  # CPUs per decode task
    accelerator_type: str | None = None  # e.g. "H100": replicas only on nodes with that accelerator
    runtime_env: dict[str, Any] | None = None  # merged into the workers' runtime_env (env_vars, pip, ...)
    num_cpus: int | None = None  # only when this call starts a local cluster
    shutdown: bool | None = None  # ray.shutdown() at the end; None: only if this call started Ray


@dataclass(slots=True)
class _Pending:
    """Driver-side state of one item sent to Ray: rows are written against it as they come back."""

    item: AudioItem
    source: Fingerprint | None
    version: int
    prompt: str
    begun: bool = False


# --- sampling: the same parameters VllmEngine.sampling_params builds, computed without an engine -----


def generation_defaults(model: str) -> dict[str, Any]:
    """The checkpoint's sampling defaults, as vLLM's ``LLM.get_default_sampling_params`` reads them.

    Ray's engine stage builds ``SamplingParams`` from a plain dict per row (vLLM's neutral defaults
    otherwise), so the generation_config defaults flamingo's own engine starts from are added here.
    """
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model).to_diff_dict()
    except OSError:
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model)).to_diff_dict()
        except OSError:
            config = {}
    return {p: config[p] for p in _GENERATION_PARAMS if config.get(p) is not None}


def sampling_dict(model: str, sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for every request (before its per-request seed):
    the same merge as the local engines (``engine.sampling_kwargs``) over the checkpoint's defaults.
    No log-probabilities: ray.data.llm would ship a dict per token through Arrow (avg_logprob is null)."""
    params = sampling_kwargs(sampling, generation_defaults(model))
    params.pop("logprobs", None), params.pop("flat_logprobs", None)
    return params


def stop_token_ids(model: str) -> frozenset[int]:
    """Token ids that end a request as "stop" (the tokenizer's and generation_config's EOS ids).

    Ray's engine stage returns the generated tokens but not vLLM's finish_reason; vLLM checks these ids
    before the length cap, so a last token in this set means "stop" and a full budget otherwise means
    "length".
    """
    ids: set[int] = set()
    with contextlib.suppress(Exception):
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(model).eos_token_id
        if eos is not None:
            ids.add(int(eos))
    return frozenset(int(i) for i in ids)


# --- Ray-side functions (module level so workers import them by reference) -------------------------


@lru_cache(maxsize=8)
def _builder(family: str, chat_template: str | None) -> PromptBuilder:
    return PromptBuilder(FAMILIES[family], chat_template)


def _row(seq: int, todo: int, *, error: str | None = None, chunk: Chunk | None = None, **llm: Any) -> dict[str, Any]:
    """One prepared row; every row has the same keys, so Ray's blocks keep one schema."""
    nan = float("nan")
    return {
        "seq": seq,
        "todo": todo,
        "chunk_index": 0 if chunk is None else chunk.index,
        "num_chunks": 0 if chunk is None else chunk.num_chunks,
        "start_s": nan if chunk is None else chunk.start_s,
        "end_s": nan if chunk is None else chunk.end_s,
        "duration_s": nan if chunk is None else chunk.duration_s,
        "error": error,
        "text": llm.get("text"),
        "audio": llm.get("audio"),
        "seed": llm.get("seed", -1),
    }


def prepare_item(
    row: dict[str, Any],
    *,
    family: str,
    chat_template: str | None,
    max_chunk_s: float,
    chunk_s: float | None,
    overlap_s: float,
    seed: int | None,
) -> list[dict[str, Any]]:
    """In a Ray task: a driver row -> ``prepare.prepare`` (decode, chunks, prompts) -> chunk rows.

    Returns one row per chunk still to caption (the driver sent the done ones as ``skip``), or one error
    row when the file cannot be decoded or chunked; never raises for a bad file.
    """
    seq = int(row["seq"])
    duration = row.get("duration")
    item = AudioItem(
        id=str(row["id"]),
        path=str(row["path"]),
        offset=float(row.get("offset") or 0.0),
        duration=None if duration is None or (isinstance(duration, float) and math.isnan(duration)) else duration,
        data=row.get("data"),
    )
    skip = {int(i) for i in (row.get("skip") if row.get("skip") is not None else ())}
    prepared = prepare(
        item,
        max_chunk_s=max_chunk_s,
        chunk_s=chunk_s,
        overlap_s=overlap_s,
        prompts=_builder(family, chat_template),
        prompt=str(row["prompt"]),
        skip=skip,
    )
    if prepared.error is not None:
        return [_row(seq, 1, error=prepared.error)]
    todo = len(prepared.requests)
    out = []
    for request in prepared.requests:
        chunk = request.chunk
        if chunk.error:
            out.append(_row(seq, todo, error=chunk.error, chunk=chunk))
            continue
        out.append(
            _row(
                seq,
                todo,
                chunk=chunk,
                text=request.text,
                audio=np.ascontiguousarray(chunk.samples, dtype=np.float32),
                seed=-1 if seed is None else request_seed(seed, request),
            )
        )
    return out


def to_engine_row(row: dict[str, Any], *, sampling: dict[str, Any]) -> dict[str, Any]:
    """ray.data.llm preprocess: a prepared row -> prompt, audio and sampling for the vLLM stage."""
    if row.get("error"):
        return {ERROR_COLUMN: str(row["error"]), "audio": None}
    params = dict(sampling)
    if row.get("seed") is not None and int(row["seed"]) >= 0:
        params["seed"] = int(row["seed"])
    audio = np.asarray(row["audio"], dtype=np.float32)
    return {
        "prompt": row["text"],
        "multimodal_data": {"audio": [(audio, SAMPLE_RATE)]},
        "sampling_params": params,
        "audio": None,  # the samples now travel in multimodal_data only
        "text": None,
    }


def finish_reason(tokens: Sequence[int], max_tokens: int, stop_ids: frozenset[int]) -> str:
    """vLLM's finish reason from the generated tokens: an EOS id first, then the length cap."""
    if len(tokens) and int(tokens[-1]) in stop_ids:
        return "stop"
    return "length" if len(tokens) >= max_tokens else "stop"


def from_engine_row(row: dict[str, Any], *, max_tokens: int, stop_ids: frozenset[int]) -> dict[str, Any]:
    """ray.data.llm postprocess (successful rows only): keep what the sink needs, drop the rest."""
    tokens = row.get("generated_tokens")
    tokens = [] if tokens is None else [int(t) for t in tokens]
    return {
        **{k: row.get(k) for k in _CHUNK_KEYS},
        "caption": row.get("generated_text"),
        "finish_reason": finish_reason(tokens, max_tokens, stop_ids),
        "prompt_tokens": row.get("num_input_tokens"),
        "output_tokens": len(tokens),
    }


# --- driver ------------------------------------------------------------------------------------------


def _decide_items(
    job: CaptionJob,
    items: Iterable[AudioItem],
    sink: ResultSink,
    stats: Stats,
    index: ResumeIndex | None,
    stop_event: threading.Event | None,
) -> tuple[list[dict[str, Any]], dict[int, _Pending]]:
    """Decide per item what Ray must do, with the regular pipeline's rules (its Planner).

    Items already complete are skipped, partly written ones send the chunks to skip, changed files get
    a new source_version; items bad before decoding get their error row here.
    """
    planner = Planner(job, index, stats)
    rows: list[dict[str, Any]] = []
    pending: dict[int, _Pending] = {}
    for raw in items:
        if stop_event is not None and stop_event.is_set():
            break
        item = with_source(planner.unique(raw), job.content_hash)  # the survey's fingerprint if it took one
        with stats.lock:
            stats.items_seen += 1
        source = item.source
        decision = planner.decide(item, source)
        if not decision.wanted:
            with stats.lock:
                stats.items_skipped += 1
            continue
        if item.error:
            planner.fail_item(sink, item, item.error, decision)
            continue
        with stats.lock:
            stats.items_queued += 1
        skip = planner.done_chunks(item, decision)
        prompt = planner.prompt(item)
        seq = len(rows)
        rows.append(
            {
                "seq": seq,
                "id": item.id,
                "path": item.path,
                "data": item.data,  # embedded audio (dataset rows, tar members); None for files and URLs
                "offset": float(item.offset),
                "duration": None if item.duration is None else float(item.duration),
                "prompt": prompt,
                "skip": sorted(skip),
            }
        )
        pending[seq] = _Pending(item, decision.source, decision.version, prompt)
    stats.sources_exhausted = True
    return rows, pending


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _result(row: dict[str, Any], entry: _Pending) -> Result:
    """A row from Ray -> the Result the sink writes (the same fields the regular engine fills)."""
    item = entry.item
    error = row.get("error") or None
    if int(row.get("num_chunks") or 0) == 0:
        return error_result(item, str(error or "no chunks"))
    chunk = Chunk(
        item=item,
        index=int(row["chunk_index"]),
        num_chunks=int(row["num_chunks"]),
        start_s=_float(row.get("start_s")),
        end_s=_float(row.get("end_s")),
        samples=None,
        duration_s=_float(row.get("duration_s")),
        error=error,
    )
    if error:  # failed before the engine: too short for a sound token
        return Result(chunk=chunk, prompt=entry.prompt, error=error)
    engine_error = row.get(ERROR_COLUMN) or ""
    if engine_error:
        return Result(chunk=chunk, prompt=entry.prompt, error=f"rejected by the engine: {engine_error}")
    return Result(
        chunk=chunk,
        prompt=entry.prompt,
        caption=row.get("caption"),
        finish_reason=row.get("finish_reason"),
        prompt_tokens=None if row.get("prompt_tokens") is None else int(row["prompt_tokens"]),
        output_tokens=None if row.get("output_tokens") is None else int(row["output_tokens"]),
    )


def _runtime_env(config: EngineConfig, settings: RaySettings, use_gpu: bool) -> dict[str, Any]:
    env: dict[str, Any] = dict(settings.runtime_env or {})
    env_vars = engine_env(config, use_gpu)
    if not config.verbose:
        env_vars.update(QUIET_ENV)
    env["env_vars"] = {**env_vars, **dict(env.get("env_vars") or {})}
    return env


def _no_uv_worker_hook() -> None:
    """Ray workers run this interpreter, not ``uv run``, unless RAY_ENABLE_UV_RUN_RUNTIME_ENV says so.

    When the driver runs under ``uv run``, Ray (>= 2.43) by default starts every worker as ``uv run``
    in a copy of the working directory, which syncs a fresh environment without the project's extras
    (no ray, no vllm): the workers die at import and Ray waits for them forever. flamingo's nodes are
    installed as the README says (same environment on every node), so the driver's own interpreter is
    right. The constant is read at ray import time; set it on the module too in case ray came first.
    """
    if os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0") != "0":
        return
    try:
        from ray._private import ray_constants

        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    except (ImportError, AttributeError):  # a Ray without the hook: nothing to turn off
        pass


def _init_ray(settings: RaySettings, verbose: bool) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    _no_uv_worker_hook()
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "address": settings.address,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if settings.address is None and settings.num_cpus is not None:
        kwargs["num_cpus"] = settings.num_cpus
    if settings.address is None:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return True


def _quiet_logs() -> None:
    """Keep Ray's, Ray Data's and ray.data.llm's INFO lines off flamingo's terminal (before importing them).

    ray.llm gives each module logger its own INFO handler unless ``ray.llm`` already has a handler; a
    NullHandler there makes them inherit ``ray.llm``'s level instead. Loggers that already exist (a
    second run in one process) are set directly.
    """
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    for name in ("ray.data", "ray.llm", *list(logging.root.manager.loggerDict)):
        if name.startswith(("ray.data", "ray.llm")):
            logging.getLogger(name).setLevel(logging.ERROR)
    # ray.data.llm calls ray.init() again, which resets the "ray" logger to INFO ("Calling ray.init()
    # again..."); torch warns about CUDA_HOME on CPU hosts.
    for name in ("ray._private.worker", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_ray_data(verbose: bool) -> None:
    """No Ray Data progress bars unless verbose (workers' logs stay in Ray's session folder)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        _quiet_logs()  # Ray Data sets its loggers up when imported


def _build_processor(config: Any, **kwargs: Any) -> Any:
    """``ray.data.llm.build_processor`` (Ray >= 2.57), ``build_llm_processor`` before it."""
    import ray.data.llm as rdl

    build = getattr(rdl, "build_processor", None) or rdl.build_llm_processor
    return build(config, **kwargs)


def run_ray_pipeline(
    job: CaptionJob,
    items: Iterable[AudioItem],
    config: EngineConfig,
    sink: ResultSink,
    stats: Stats | None = None,
    index: ResumeIndex | None = None,
    *,
    settings: RaySettings | None = None,
    chat_template: str | None = None,
    on_result: Callable[[Result], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    stop_event: threading.Event | None = None,
    run_info: dict[str, Any] | None = None,
) -> Stats:
    """``pipeline.run_pipeline``'s Ray twin: caption ``items`` on a Ray cluster, write to ``sink``.

    ``config`` sizes each vLLM replica exactly as ``flamingo caption`` sizes its one engine;
    ``chat_template`` is the checkpoint's (``prompts.load_chat_template``), None for the family's
    default. ``run_info`` (the Sink's metadata dict) gets the versions and the effective sampling.
    Raises EngineError when the Ray job fails (engine start, lost actors); finished rows are kept.
    """
    settings = settings or RaySettings()
    if importlib.util.find_spec("ray") is None:
        raise RayNotInstalledError(
            "Ray is not installed: install flamingo with the 'ray' extra (uv sync --extra gpu --extra ray)"
        )
    if not config.verbose:
        quiet_env()  # vLLM and torch read it at import, in the driver as on the workers
        _quiet_logs()
    stats = stats or Stats()
    rows, pending = _decide_items(job, items, sink, stats, index, stop_event)
    params = sampling_dict(config.model, job.sampling)
    seed = config.seed if job.sampling.seed is None else job.sampling.seed
    if run_info is not None:
        run_info.update(
            {"versions": engine_versions(), "sampling_effective": effective_sampling(params, seed), "executor": "ray"}
        )
    if not rows or (stop_event is not None and stop_event.is_set()):
        return stats

    import ray

    started = _init_ray(settings, config.verbose)
    try:
        _quiet_ray_data(config.verbose)
        use_gpu = settings.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        dataset = _dataset(job, config, settings, rows, params, seed, use_gpu, chat_template)
        _consume(
            dataset, pending, sink, stats, on_result, on_tick, stop_event, output_check(job.sampling),
            think=config.family.think, judge=Ladder(job, stats=stats).judge,
        )  # fmt: skip
    finally:
        if settings.shutdown or (settings.shutdown is None and started):
            ray.shutdown()
    return stats


def _dataset(
    job: CaptionJob,
    config: EngineConfig,
    settings: RaySettings,
    rows: list[dict[str, Any]],
    params: dict[str, Any],
    seed: int,
    use_gpu: bool,
    chat_template: str | None,
) -> Any:
    """The lazy Ray dataset: items -> prepared chunk rows -> ray.data.llm's vLLM processor -> rows."""
    import ray
    from ray.data.llm import vLLMEngineProcessorConfig

    temperature = params.get("temperature", 1.0)
    prepare = partial(
        prepare_item,
        family=config.family.name,
        chat_template=chat_template,
        max_chunk_s=job.max_chunk_s,
        chunk_s=job.chunk_s,
        overlap_s=job.overlap_s,
        seed=seed if temperature and temperature > 0 else None,
    )
    processor_config = vLLMEngineProcessorConfig(
        model_source=config.model,
        engine_kwargs=engine_kwargs(config, use_gpu),
        batch_size=settings.batch_size,
        concurrency=settings.num_replicas,
        max_concurrent_batches=settings.max_concurrent_batches,
        accelerator_type=settings.accelerator_type,
        # flamingo renders the prompts itself (the checkpoint's template) and vLLM detokenizes.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        log_engine_metrics=False,
        runtime_env=_runtime_env(config, settings, use_gpu),
        # A CPU replica must not ask Ray for a GPU (the vLLM stage's default for one engine).
        placement_group_config=None if use_gpu else {"bundles": [{"CPU": settings.cpus_per_replica}]},
    )
    processor = _build_processor(
        processor_config,
        preprocess=partial(to_engine_row, sampling=params),
        postprocess=partial(
            from_engine_row, max_tokens=job.sampling.max_tokens, stop_ids=_stop_ids(config.model, params)
        ),
    )
    dataset = ray.data.from_items(rows).flat_map(prepare, num_cpus=settings.decode_cpus)
    return processor(dataset)


def _stop_ids(model: str, params: dict[str, Any]) -> frozenset[int]:
    return frozenset() if params.get("ignore_eos") else stop_token_ids(model)


def _consume(
    dataset: Any,
    pending: dict[int, _Pending],
    sink: ResultSink,
    stats: Stats,
    on_result: Callable[[Result], None] | None,
    on_tick: Callable[[], None] | None,
    stop_event: threading.Event | None,
    check: Callable[[Result], Result] | None = None,
    think: bool = False,
    judge: Callable[[Result], Result | None] | None = None,
) -> None:
    """Stream the dataset's rows into the sink as they finish (any order); think output split apart,
    then ``check`` validates outputs (a schema run)."""
    begin = getattr(sink, "begin_item", None)
    remaining: dict[int, int] = {}
    rows = iter(dataset.iter_rows())
    while stop_event is None or not stop_event.is_set():
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as exc:
            raise EngineError(
                f"the Ray Data job failed: {type(exc).__name__}: {_last_line(exc)} (the replicas' own logs are in "
                "the Ray session's logs folder, /tmp/ray/session_latest/logs on each node; verbose=True shows them)"
            ) from exc
        seq = int(row["seq"])
        entry = pending.get(seq)
        if entry is None:  # pragma: no cover - a row for an item already finished (retried task)
            continue
        if not entry.begun:
            entry.begun = True
            remaining[seq] = int(row.get("todo") or 1)
            if begin is not None:
                begin(entry.item.id, entry.source, entry.version, remaining[seq])
        result = with_reasoning(_result(row, entry), think)
        if judge is not None:  # the flags (fallback.Ladder without a policy: never holds a result back)
            result = judge(result) or result
        if check is not None:
            result = check(result)
        sink.write(result)
        stats.add_result(result, queued=True)
        remaining[seq] -= 1
        if remaining[seq] <= 0:
            del remaining[seq], pending[seq]
        if on_result:
            on_result(result)
        if on_tick:
            on_tick()
        flush_if_due = getattr(sink, "flush_if_due", None)
        if flush_if_due is not None:
            flush_if_due()
    with contextlib.suppress(Exception):
        rows.close()  # type: ignore[attr-defined]


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


# --- one call for Python users -------------------------------------------------------------------------
