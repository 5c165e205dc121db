"""One caption run, fully specified and validated once: ``CaptionSpec``.

The CLI, ``flamingo_cli.caption(...)`` and the Ray executor all build this, so the same settings give
the same run key and the same rows, and a bad value fails the same way through each (``SpecError``,
exit 2, before any model loads). The merge rule, lowest to highest: the checkpoint's
``generation_config.json`` (applied by the engine, ``engine.sampling_kwargs``), then the task preset,
then the caller's overrides. ``seed`` and ``max_tokens`` live in ``Sampling`` only.

To add an option: a field here (with its check in ``_validate``), the Typer option in ``cli.py`` with
the same name; ``api.caption`` takes it as a keyword at once. Options that change what is generated
belong in ``identity()`` (and so in the run key); how it runs (GPUs, workers, logs) does not. An engine
option is a field of ``engine_options.EngineOptions`` instead (its rule and run-key role with it):
``build`` routes it there by name.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flamingo_cli.config import Preset, load_preset
from flamingo_cli.engine_options import ENGINE_OPTIONS, EngineOptionError, EngineOptions, check_range
from flamingo_cli.errors import UsageError
from flamingo_cli.models import ModelFamily, family_for, resolve_model_id
from flamingo_cli.records import AudioItem, Sampling

EXECUTORS = ("local", "ray")
DEFAULT_MAX_TOKENS = 512
MM_CACHE_GB = 4.0  # vLLM's multimodal processor cache of a several-task run


class SpecError(UsageError):
    """An option with a bad value or an unknown option: the message names it and says what is allowed."""


@dataclass(frozen=True)
class CaptionSpec:
    """Every setting of one caption run. Build with ``CaptionSpec.build(inputs, out, **options)``."""

    inputs: tuple[str, ...]
    out: str
    model: str  # hub id or local checkpoint folder
    family: ModelFamily
    task: str  # the preset's name
    prompt: str
    sampling: Sampling
    preset: Preset | None = field(default=None, compare=False, repr=False)
    # A structured-caption run's JSON Schema (schema.JsonSchema; its text is also sampling.json_schema).
    json_schema: Any = field(default=None, compare=False, repr=False)
    # what is captioned and how it is cut
    chunk_seconds: float | None = None
    overlap: float = 0.0
    extensions: tuple[str, ...] | None = None
    shard: tuple[int, int] | None = None
    retry_failed: bool = False
    content_hash: bool = False
    # gates (gates.py): silence and duplicate audio get rows without an engine request; --vad measures speech.
    # Not in the run key: a gated row is an outcome like an error row, and --keep-silence redoes it.
    keep_silence: bool = False
    silence_peak_db: float = -60.0
    silence_active_ratio: float = 0.0
    dedupe_audio: bool = True
    vad: bool = False
    # An item cut into several chunks gets a track row (issue 26) with this instruction; None: no track
    # rows (--no-track-summary, and the Ray executor). Not in the identity: it changes no chunk row.
    track_prompt: str | None = None
    # output
    rows_per_part: int = 1000
    # where it runs
    executor: str = "local"
    gpus: str = "all"
    replicas: int | None = None
    devices: tuple[str | None, ...] = ()
    ray_address: str | None = None
    ray_replicas: int | tuple[int, int] = 1
    ray_settings: Any = field(default=None, compare=False)  # ray_data.RaySettings: the rest of Ray's knobs
    workers: int | None = None
    # the engine: dtype, memory, batch caps, FP8, ... (each a keyword of ``build`` by its field name)
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    # what the operator sees
    quiet: bool = False
    verbose: bool = False
    log_file: str | None = None
    log_interval: float = 30.0
    summary_json: str | None = None
    # confidence (issue 25b): the flag thresholds (flamingo_cli/quality.py) and --fallback
    # (flamingo_cli/fallback.py); in the run key only with --fallback on (then they change captions)
    flag_compression_ratio: float = 2.4
    flag_min_logprob: float = -1.0
    fallback: bool = False
    fallback_on: tuple[str, ...] = ("empty", "low_confidence", "repetition")
    fallback_temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    # Several tasks in one pass (``--task a --task b``, ``tasks=[...]``): the specs of the tasks after
    # this one, each with its own run key; every file is decoded once and each chunk asked every task.
    more_tasks: tuple[CaptionSpec, ...] = field(default=(), compare=False, repr=False)

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def build(cls, inputs: Sequence[str | Path] | str | Path, out: str | Path, **options: Any) -> CaptionSpec:
        """Merge preset and overrides, resolve the model, validate everything; raises SpecError.

        ``options`` are ``flamingo caption``'s options with underscores: ``task``, ``model``, ``prompt``,
        ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``max_tokens``,
        ``chunk_seconds``, ``overlap``, ``ext``, ``shard`` ("i/N" or (i, N)), ``executor``, ``gpus``, …
        (``hash`` is accepted for ``content_hash``). None means "not given".
        """
        opts = {k: v for k, v in options.items() if v is not None}
        tasks = opts.pop("tasks", None)
        if tasks is not None and "task" in opts:
            raise SpecError("give task or tasks, not both")
        task_opt = opts.get("task", tasks)
        if isinstance(task_opt, (list, tuple)):
            names = [str(t) for t in task_opt]
            if len(names) > 1:
                return cls._build_tasks(inputs, out, names, {k: v for k, v in opts.items() if k != "task"})
            opts["task"] = names[0] if names else "caption"
        if "hash" in opts:
            opts["content_hash"] = opts.pop("hash")
        for name in ("log_file", "summary_json"):
            if name in opts:
                opts[name] = str(opts[name])
        _confidence_options(opts)
        for name in ("chunk_seconds", "overlap", "log_interval", "silence_peak_db", "silence_active_ratio"):
            # the CLI hands floats: 20 and 20.0 must be one run key
            if isinstance(opts.get(name), int) and not isinstance(opts[name], bool):
                opts[name] = float(opts[name])
        task = str(opts.pop("task", "caption"))
        sampling_opts = {k: opts.pop(k) for k in _SAMPLING_OPTIONS if k in opts}
        ext = opts.pop("ext", None)
        shard = opts.pop("shard", None)
        ray_replicas = opts.pop("ray_replicas", 1)
        model_opt = opts.pop("model", None)
        prompt_opt = opts.pop("prompt", None)
        schema_opt = opts.pop("schema", None)
        track_prompt_opt = opts.pop("track_prompt", None)
        track_summary = not opts.pop("no_track_summary", False)
        engine_options = EngineOptions(**{k: opts.pop(k) for k in ENGINE_OPTIONS if k in opts})
        known = {f.name for f in fields(cls)} - {"inputs", "out", "model", "family", "task", "prompt", "sampling"}
        known -= {"preset", "devices", "extensions", "json_schema", "engine_options", "track_prompt"}
        known |= set(ENGINE_OPTIONS)
        unknown = sorted(set(opts) - known)
        if unknown:
            raise SpecError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known | _PUBLIC))}")

        preset = load_preset(task)
        model = resolve_model_id(str(model_opt or preset.model))
        try:
            family = family_for(model)
        except ValueError as exc:
            raise SpecError(str(exc)) from exc
        prompt = prompt_opt if prompt_opt is not None else preset.prompt
        sampling = _sampling(preset, sampling_opts, default_max_tokens=family.max_new_tokens or DEFAULT_MAX_TOKENS)
        json_schema = _json_schema(schema_opt, preset)
        if json_schema is not None:
            sampling = replace(sampling, json_schema=json_schema.text)
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        spec = cls(
            inputs=tuple(str(i) for i in inputs),
            out=str(out),
            model=model,
            family=family,
            task=preset.name,
            prompt=prompt,
            sampling=sampling,
            preset=preset,
            json_schema=json_schema,
            extensions=_extensions(ext),
            shard=_shard(shard),
            ray_replicas=_ray_replicas(ray_replicas),
            engine_options=engine_options,
            **opts,
        )
        object.__setattr__(spec, "track_prompt", _track_prompt(spec, preset, track_prompt_opt, track_summary))
        spec._validate()
        if spec.executor == "local":
            object.__setattr__(spec, "devices", spec._devices())
        return spec

    @classmethod
    def _build_tasks(cls, inputs: Any, out: Any, names: list[str], opts: dict[str, Any]) -> CaptionSpec:
        """Several tasks, one pass: one spec per task with the same options (so each keeps the run key
        its one-task run gets), refused where they cannot share one engine and one cut of the audio."""
        if len(set(names)) < len(names):
            raise SpecError(f"--task given twice: {', '.join(names)}")
        for name in ("prompt", "schema", "track_prompt"):
            if opts.get(name) is not None:
                flag = "--" + name.replace("_", "-")
                raise SpecError(f"{flag} with several tasks: each task keeps its preset's (run them one by one)")
        if opts.get("executor", "local") != "local":
            raise SpecError("several tasks in one pass are for the local executor (not --executor ray)")
        specs = [cls.build(inputs, out, task=name, **opts) for name in names]
        first = specs[0]
        for spec in specs[1:]:
            if spec.model != first.model:
                raise SpecError(
                    f"tasks {first.task} and {spec.task} run different models ({first.model}, {spec.model}): "
                    "several tasks share one engine; give --model, or run them one by one"
                )
        if len({s.run_key for s in specs}) < len(specs):  # two names of one preset (a name and its file)
            raise SpecError(f"--task {' '.join(names)}: two of them are the same task")
        object.__setattr__(first, "more_tasks", tuple(specs[1:]))
        return first

    @property
    def tasks(self) -> tuple[CaptionSpec, ...]:
        """Every task of the run, this one first: one spec (one run key) each."""
        return (self, *self.more_tasks)

    @property
    def task_names(self) -> str:
        """``caption`` or, with several tasks, ``caption+audio-tags``."""
        return "+".join(s.task for s in self.tasks)

    def with_options(self, **options: Any) -> CaptionSpec:
        """A copy with run-time options changed (not the identity: use ``build`` for that)."""
        engine = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
        spec = replace(self, **options, engine_options=replace(self.engine_options, **engine))
        spec._validate()
        if self.more_tasks:
            more = tuple(s.with_options(**options, **engine) for s in self.more_tasks)
            object.__setattr__(spec, "more_tasks", more)
        return spec

    def _validate(self) -> None:
        if not self.inputs:
            raise SpecError("no inputs: give at least one folder, audio file or manifest")
        if not str(self.out).strip():
            raise SpecError("--out is empty")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SpecError("--prompt is empty")
        cap = self.family.max_audio_s
        if self.chunk_seconds is not None and not (0 < self.chunk_seconds <= cap):
            raise SpecError(f"--chunk-seconds must be in (0, {cap}] for {self.family.name}")
        if self.chunk_seconds is not None and not (0 <= self.overlap < self.chunk_seconds):
            raise SpecError("--overlap must be ≥ 0 and shorter than --chunk-seconds")
        if self.chunk_seconds is None and self.overlap:
            raise SpecError("--overlap needs --chunk-seconds")
        _check_range("--rows-per-part", self.rows_per_part, lo=1, integer=True)
        if self.workers is not None:
            _check_range("--workers", self.workers, lo=1, integer=True)
        if self.executor not in EXECUTORS:
            raise SpecError(f"--executor {self.executor!r}: expected {' or '.join(EXECUTORS)}")
        self._check_engine_options()
        if self.replicas is not None:
            _check_range("--replicas", self.replicas, lo=1, integer=True)
        _check_range("--log-interval", self.log_interval, lo=0, lo_open=True)
        _check_range("--flag-compression-ratio", self.flag_compression_ratio, lo=0, lo_open=True)
        _check_range("--flag-min-logprob", self.flag_min_logprob, hi=0)
        if self.fallback and self.executor != "local":
            raise SpecError("--fallback runs on the local executor only (not with --executor ray)")
        if self.fallback and not self.fallback_on:
            raise SpecError("--fallback-on is empty: name the flags that send a chunk back, e.g. repetition,empty")
        self._check_gates()

    def _check_gates(self) -> None:
        from flamingo_cli.gates import FLOOR_DBFS, VadNotInstalledError, check_vad

        _check_range("--silence-peak-db", self.silence_peak_db, lo=FLOOR_DBFS, hi=0)
        _check_range("--silence-active-ratio", self.silence_active_ratio, lo=0, hi=1)
        if self.silence_active_ratio >= 1:
            raise SpecError("--silence-active-ratio 1.0: expected a number below 1 (1 would call every chunk silent)")
        for name in ("keep_silence", "dedupe_audio", "vad"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} {getattr(self, name)!r}: expected true or false")
        if self.executor == "ray" and (self.vad or self.keep_silence):
            raise SpecError(
                "--vad and --keep-silence are for the local executor: --executor ray applies no gates "
                "(no silence or duplicate gate, no audio measures)"
            )
        if self.vad:
            try:
                check_vad()
            except VadNotInstalledError as exc:
                raise SpecError(str(exc)) from exc

    def gates(self) -> Any:
        """The run's ``gates.GateSettings``; None with ``--executor ray`` (which applies none)."""
        if self.executor != "local":
            return None
        from flamingo_cli.gates import GateSettings

        return GateSettings(
            keep_silence=self.keep_silence,
            silence_peak_db=float(self.silence_peak_db),
            silence_active_ratio=float(self.silence_active_ratio),
            dedupe_audio=self.dedupe_audio,
            vad=self.vad,
        )

    def _check_engine_options(self) -> None:
        """Each engine option's rule (``EngineOptions.check``); what needs a GPU the engine will not have
        fails now, not after minutes of model loading."""

        def use_gpu() -> bool:
            from flamingo_cli.engine import has_cuda

            # A Ray cluster's GPUs are not this host's: only the values are checked for it.
            return self.executor != "local" or has_cuda()

        try:
            self.engine_options.check(use_gpu)
        except EngineOptionError as exc:
            raise SpecError(str(exc)) from exc

    def _devices(self) -> tuple[str | None, ...]:
        from flamingo_cli.data_parallel import replica_devices

        try:
            return tuple(replica_devices(self.gpus, self.engine_options.tensor_parallel_size, self.replicas))
        except ValueError as exc:
            raise SpecError(str(exc)) from exc

    # -- what the run is ---------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What makes a run (hashed into the run key): changing any of it starts a separate result set."""
        return {
            "model": self.model,
            "task": self.task,
            "prompt": self.prompt,
            "sampling": self.sampling.identity(),
            "chunk_seconds": self.chunk_seconds,
            "overlap": self.overlap,
            **self.engine_options.identity(),
            **({"fallback": self._fallback_identity()} if self.fallback else {}),
        }

    def _fallback_identity(self) -> dict[str, Any]:
        """--fallback's settings, all of which decide which captions are kept (the run key has them)."""
        policy = self.fallback_policy()
        assert policy is not None
        return {**policy.identity(), **self.quality_rules().identity(), "logprobs": self.sampling.logprobs}

    def quality_rules(self) -> Any:
        """The flag thresholds (``quality.QualityRules``)."""
        from flamingo_cli.quality import QualityRules

        return QualityRules(compression_ratio=self.flag_compression_ratio, min_logprob=self.flag_min_logprob)

    def fallback_policy(self) -> Any:
        """--fallback's ``fallback.FallbackPolicy``, None when off."""
        if not self.fallback:
            return None
        from flamingo_cli.fallback import FallbackPolicy

        return FallbackPolicy(on=frozenset(self.fallback_on), temperatures=tuple(self.fallback_temperatures))

    @property
    def run_key(self) -> str:
        from flamingo_cli.output.layout import run_key

        return run_key(self.identity())

    def run_info(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The run metadata stored with every part (the engine adds versions and effective sampling)."""
        info: dict[str, Any] = {
            "identity": self.identity(),
            "argv": list(sys.argv[1:] if argv is None else argv),
            "family": self.family.name,
        }
        if self.json_schema is not None:
            info["schema"] = self.json_schema.describe()
        if self.shard:
            info["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        if self.executor != "local":
            info["executor"] = self.executor
        if self.track_prompt is not None:
            info["track_prompt"] = self.track_prompt
        info["quality"] = {**self.quality_rules().identity(), "logprobs": self.sampling.logprobs}
        if self.fallback:
            info["fallback"] = self._fallback_identity()
        return info

    def check_schema(self) -> list[str]:
        """The schema against vLLM's xgrammar validator (imports vLLM, so not in ``build``: a dry run
        never imports it); raises SchemaError, a usage error, before any model loads. Returns the
        warnings to show first (a schema that will cost throughput)."""
        if self.json_schema is None:
            return []
        from flamingo_cli.schema import check_constrainable

        check_constrainable(self.json_schema.value, self.json_schema.source)
        warning = self.json_schema.cost_warning()
        return [] if warning is None else [warning]

    def sink_columns(self) -> dict[str, Any]:
        """``Sink`` keywords for the run's own columns: a schema run's ``caption_json`` and ``f_*``."""
        if self.json_schema is None:
            return {}
        return {"extra_fields": self.json_schema.arrow_fields(), "extra_values": self.json_schema.row_values}

    @property
    def max_chunk_s(self) -> float:
        """The longest chunk the spec allows: --chunk-seconds, else the model's cap."""
        return float(self.chunk_seconds or self.family.max_audio_s)

    def engine_config(self, longest_chunk_s: float | None = None) -> Any:
        """The engine's settings; ``longest_chunk_s`` (from the plan) sizes it below the cap."""
        from flamingo_cli.engine import EngineConfig
        from flamingo_cli.models import WINDOW_S

        max_chunk_s = float(self.family.max_audio_s)
        if longest_chunk_s is not None and longest_chunk_s > 0:
            # A power of two of encoder windows: room for a file that grew since the plan, and few
            # distinct sizes, so an engine cached in a process (notebooks, tests) is reused.
            windows = 1 << max(0, math.ceil(math.log2(max(1.0, longest_chunk_s / WINDOW_S))))
            max_chunk_s = min(max_chunk_s, float(windows * WINDOW_S))
        return EngineConfig(
            **self.engine_options.options(),
            model=self.model,
            family=self.family,
            max_chunk_s=max_chunk_s,
            max_tokens=max(s.sampling.max_tokens for s in self.tasks),
            seed=self.seed,
            verbose=self.verbose,
            # several tasks ask each chunk back to back: the processor cache reuses its audio features
            mm_cache_gb=MM_CACHE_GB if self.more_tasks else 0.0,
            devices=self.devices if self.executor == "local" else (),
        )

    @property
    def seed(self) -> int:
        return 0 if self.sampling.seed is None else int(self.sampling.seed)

    def items(self, scan: Any = None) -> Iterator[AudioItem]:
        """The inputs as a lazy, deterministic AudioItem stream (this shard's share of it); ``scan``
        (a sources.ScanStats) counts the files folder scans pass over."""
        from flamingo_cli.sources import iter_items, select_shard

        found = iter_items(list(self.inputs), self.extensions, stats=scan)
        return select_shard(found, *self.shard) if self.shard else found

    def check_inputs(self) -> None:
        """Every input exists and every manifest opens: before a model loads."""
        from flamingo_cli.sources import check_inputs

        check_inputs(self.inputs)

    def default_workers(self) -> int:
        import os

        if self.workers is not None:
            return self.workers
        return max(4, min(4 * max(1, len(self.devices)), os.cpu_count() or 4))

    def job(self, chat_template: str | None = None) -> Any:
        """The executors' view (``planner.CaptionJob``), with the checkpoint's chat template."""
        from flamingo_cli.planner import CaptionJob
        from flamingo_cli.prompts import PromptBuilder

        return CaptionJob(
            inputs=list(self.inputs),
            prompts=PromptBuilder(self.family, chat_template),
            prompt=self.prompt,
            max_chunk_s=float(self.family.max_audio_s),
            sampling=self.sampling,
            chunk_s=self.chunk_seconds,
            overlap_s=self.overlap,
            extensions=self.extensions,
            workers=self.default_workers(),
            retry_failed=self.retry_failed,
            content_hash=self.content_hash,
            gates=self.gates(),
            track_prompt=self.track_prompt,
            quality=self.quality_rules(),
            fallback=self.fallback_policy(),
        )


# -- option parsing and checks ---------------------------------------------------------------------

_SAMPLING_OPTIONS = (
    "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "ignore_eos", "logprobs",
)  # fmt: skip
_PUBLIC = {
    "task",
    "model",
    "prompt",
    "ext",
    "shard",
    "ray_replicas",
    "hash",
    "schema",
    "no_track_summary",
    "track_prompt",
    "tasks",
    *_SAMPLING_OPTIONS,
}


def _track_prompt(spec: CaptionSpec, preset: Preset, given: str | None, on: bool) -> str | None:
    """The track rows' instruction: --track-prompt, else the preset's; None with --no-track-summary.
    The Ray executor writes no track rows (they are the local executor's): an explicit --track-prompt
    there is refused, and without one the run goes on without them."""
    if given is not None and not str(given).strip():
        raise SpecError("--track-prompt is empty")
    if not on:
        return None
    if spec.executor == "ray":
        if given is not None:
            raise SpecError("--track-prompt: track rows are made by the local executor only (not --executor ray)")
        return None
    return str(given) if given is not None else preset.track_prompt


def _check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, **rule: Any) -> None:
    check_range(name, value, lo, hi, error=SpecError, **rule)


def check_sampling(values: Mapping[str, Any], where: str = "") -> None:
    """The ranges vLLM would reject after the model loaded, checked before (a preset's values too)."""
    checks = {
        "temperature": dict(lo=0),
        "top_p": dict(lo=0, hi=1, lo_open=True),
        "repetition_penalty": dict(lo=0, lo_open=True),
        "max_tokens": dict(lo=1, integer=True),
        "seed": dict(lo=0, integer=True),
    }
    for name, rule in checks.items():
        if values.get(name) is not None:
            _check_range("--" + name.replace("_", "-"), values[name], where=where, **rule)
    top_k = values.get("top_k")
    if top_k is not None:
        _check_range("--top-k", top_k, lo=-1, integer=True, where=where)
    for name in ("ignore_eos", "logprobs"):
        if name in values and not isinstance(values[name], bool):
            raise SpecError(f"{name} {values[name]!r}{where}: expected true or false")


def _confidence_options(opts: dict[str, Any]) -> None:
    """--fallback-on and --fallback-temperatures as given (comma lists or sequences) → tuples; the
    thresholds as floats (one run key for 2 and 2.0)."""
    from flamingo_cli.fallback import parse_temperatures
    from flamingo_cli.quality import parse_flags

    try:
        if "fallback_on" in opts:
            opts["fallback_on"] = tuple(sorted(parse_flags(opts["fallback_on"], "--fallback-on") or ()))
        if "fallback_temperatures" in opts:
            opts["fallback_temperatures"] = parse_temperatures(opts["fallback_temperatures"])
    except ValueError as exc:
        raise SpecError(str(exc)) from exc
    for name in ("flag_compression_ratio", "flag_min_logprob"):
        value = opts.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            opts[name] = float(value)


def _sampling(preset: Preset, overrides: Mapping[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Sampling:
    """Preset [sampling], then overrides; the checkpoint's generation_config fills the rest later.

    ``max_tokens`` is the one the engine needs up front (it sizes max_model_len): with neither a preset
    nor an override, the checkpoint's ``max_new_tokens`` (``default_max_tokens``) decides.
    """
    check_sampling(preset.sampling, where=f" (preset {preset.source or preset.name})")
    check_sampling(overrides)
    values: dict[str, Any] = {"max_tokens": default_max_tokens, **preset.sampling, **overrides}
    values.setdefault("seed", 0)
    values["max_tokens"] = int(values["max_tokens"])
    values["seed"] = int(values["seed"])
    if values.get("top_k") is not None:
        values["top_k"] = int(values["top_k"])
    for name in ("temperature", "top_p", "repetition_penalty"):
        if values.get(name) is not None:
            values[name] = float(values[name])
    return Sampling(**values)


def _json_schema(value: Any, preset: Preset) -> Any:
    """``schema``: a .json path, a parsed schema (dict) or a ``schema.JsonSchema``; else the preset's.
    Checked here up to what needs vLLM (``CaptionSpec.check_schema``); None: a free-text run."""
    if value is None and preset.schema is None:
        return None
    from flamingo_cli.schema import JsonSchema, load_schema, parse_schema

    if isinstance(value, JsonSchema):
        return value
    if isinstance(value, (str, Path)):
        return load_schema(value, check_engine=False)
    if value is not None:
        return parse_schema(value, "the schema option", check_engine=False)
    return parse_schema(preset.schema, preset.schema_source, check_engine=False)


def _extensions(ext: Any) -> tuple[str, ...] | None:
    """``--ext wav,flac`` (repeatable) or a list; "all" tries every file."""
    if ext is None:
        return None
    groups = [ext] if isinstance(ext, str) else list(ext)
    out = [e.strip().lower() for g in groups for e in str(g).split(",") if e.strip()]
    if not out:
        return None
    bad = [e for e in out if "/" in e or "\\" in e or not e.strip(".")]
    if bad:
        raise SpecError(f"--ext {bad[0]!r}: expected extensions like wav,flac,mp3 (or all)")
    if "all" in out:
        return ("all",)
    return tuple(sorted({"." + e.lstrip(".") for e in out}))


def _shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    from flamingo_cli.sources import parse_shard

    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        shard = f"{shard[0]}/{shard[1]}"
    return parse_shard(str(shard))


def _ray_replicas(value: Any) -> int | tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        try:
            parts = [int(x) for x in str(value).split(",")]
        except ValueError:
            parts = []
    if len(parts) not in (1, 2) or not all(isinstance(p, int) and p >= 1 for p in parts) or parts != sorted(parts):
        raise SpecError(f"--ray-replicas {value!r}: expected N or MIN,MAX (≥ 1)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])
