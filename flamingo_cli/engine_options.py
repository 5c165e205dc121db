"""The engine options a caller chooses (``EngineOptions``), each with its own check, in one dataclass.

``spec.CaptionSpec`` holds one; ``EngineConfig`` (below) extends it with what a run sizes (model,
longest chunk, token budget, in-flight caps). ``CaptionSpec.build`` routes every keyword named like
one of its fields into it: a new engine option is a field here (default, rule, and whether it joins
the run key) plus the Typer option of the same name in ``cli.caption``.
A bad value raises ``EngineOptionError`` (the spec turns it into ``SpecError``, exit 2) before any
model loads; messages name the option as the CLI spells it (``--kv-cache-dtype``). Imports nothing
heavy: ``import flamingo_cli`` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from flamingo_cli.models import TOKENS_PER_WINDOW, WINDOW_S, ModelFamily

DTYPES = ("auto", "bfloat16", "float16", "float32", "half", "float")
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
MEL_DEVICES = ("auto", "cpu", "cuda")
MODEL_RUNNERS = ("auto", "v2", "v1")  # (the first other than auto differs from auto on a GPU: tests)


class EngineOptionError(ValueError):
    """An engine option that cannot work here; raised before any model loads (a usage error)."""


def check_range(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    integer: bool = False,
    where: str = "",
    error: type[Exception] = EngineOptionError,
) -> None:
    """``value`` is a finite number (an integer if ``integer``) within the bounds, else ``error``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '≥'} {lo:g}")
        if hi is not None:
            bounds.append(f"≤ {hi:g}")
        rule = f"{kind} {' and '.join(bounds)}".strip()
        raise error(f"{name} {value!r}{where}: expected {rule}")


@dataclass(frozen=True)
class Rule:
    """What values one option takes; None (where the default is None) always passes."""

    choices: tuple[str, ...] | None = None
    expected: str | None = None  # the choices in words, where the message says them otherwise
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False
    boolean: bool = False
    # value -> the message when that value needs a CUDA GPU (None: it does not)
    needs_gpu: Callable[[Any], str | None] | None = None

    def check(self, flag: str, value: Any) -> None:
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            expected = self.expected or f"one of {', '.join(self.choices)}"
            raise EngineOptionError(f"{flag} {value!r}: expected {expected}")
        if self.boolean and not isinstance(value, bool):
            raise EngineOptionError(f"{flag} {value!r}: expected true or false")
        if self.lo is not None or self.hi is not None:
            check_range(flag, value, self.lo, self.hi, lo_open=self.lo_open, integer=self.integer)


def gpu_only(value: str, message: str) -> Callable[[Any], str | None]:
    """A ``Rule.needs_gpu``: ``message`` when the option is ``value``."""
    return lambda v: message if v == value else None


def option(default: Any, rule: Rule | None = None, *, identity: bool = False) -> Any:
    """A field of ``EngineOptions``: its default, its ``Rule``, and whether it changes what is generated
    (``identity``: then it joins the run key, only when set to something other than its default, so
    the run keys of earlier runs stay as they were)."""
    return field(default=default, metadata={"rule": rule or Rule(), "identity": identity})


def flag(name: str) -> str:
    """The CLI's spelling of an option: ``kv_cache_dtype`` -> ``--kv-cache-dtype``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EngineOptions:
    """How vLLM runs the model: each field is a ``flamingo caption`` option of the same name and a keyword
    of ``CaptionSpec.build`` / ``flamingo_cli.caption``; ``vllm_args.engine_kwargs`` (and ``engine_env``)
    hand them to vLLM. None of them joins the run key today (``identity=False``)."""

    dtype: str = option("auto", Rule(choices=DTYPES))
    gpu_memory_utilization: float = option(0.9, Rule(lo=0, hi=1, lo_open=True))
    tensor_parallel_size: int = option(1, Rule(lo=1, integer=True))
    max_num_seqs: int | None = option(None, Rule(lo=1, integer=True))
    max_num_batched_tokens: int | None = option(None, Rule(lo=1, integer=True))
    enforce_eager: bool = option(False, Rule(boolean=True))
    # torch.compile of the language model. False (--no-compile): none, decode steps still replayed from
    # full CUDA graphs (FULL_DECODE_ONLY), prefill and mixed steps eager: no compile on a machine's first
    # run (its cache is empty), a shorter start on later ones. None: False on a GPU, where it measured as
    # fast on 10-s and 30-s clips with a 4-25 s shorter start (H100, 2026-12-07; BENCHMARKS.md), and
    # vLLM's default (compile) on the CPU, where it was not measured.
    compile: bool | None = option(None, Rule(boolean=True))
    # vLLM's CPU backend's KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB, at least 1)
    cpu_kv_cache_gb: float = option(2.0, Rule(lo=0, lo_open=True))
    # FP8 fast paths, a quality trade the user chooses (PARITY.md has the measured deltas): weights
    # quantised at load time ("fp8"; the language model only, vLLM's audio tower stays in its dtype)
    # and the KV cache ("fp8" = e4m3).
    quantization: str | None = option(
        None,
        Rule(
            choices=QUANTIZATIONS,
            needs_gpu=lambda v: (
                v
                and f"--quantization {v} needs a CUDA GPU (FP8 matmuls pay on Hopper or newer); "
                "vLLM's CPU backend has no FP8 weight path"
            ),
        ),
    )
    kv_cache_dtype: str = option("auto", Rule(choices=KV_CACHE_DTYPES))
    # Run the audio tower on each window's valid frames (flamingo_cli/vllm_plugin.py): exact up to
    # float rounding (PARITY.md), so on by default; False runs vLLM's untrimmed encoder.
    trim_encoder: bool = option(True, Rule(boolean=True))
    # Where vLLM's front-end computes each request's log-mel (the HF feature extractor's ``device``):
    # "auto" = the GPU when the engine runs on one, else the CPU; "cpu" = on the CPU thread that also
    # drives the engine; "cuda" = torch's STFT on the GPU. Measured on an H200 (BENCHMARKS.md,
    # 2026-12-02): the CPU log-mel starves the GPU on short clips (10-s clips 35.2 -> 48.7 windows/s).
    mel_device: str = option(
        "auto",
        Rule(
            choices=MEL_DEVICES,
            expected="auto, cpu or cuda",
            needs_gpu=gpu_only("cuda", "--mel-device cuda needs a CUDA GPU; this host has none (use auto or cpu)"),
        ),
    )

    # vLLM's model runner in the engine process: "v1" (vLLM 0.24's default for the Audio Flamingo models),
    # "v2" (its Model Runner V2: request state, penalties and log-probabilities on the GPU, Triton
    # kernels, so it needs a CUDA GPU), "auto" = flamingo's measured choice (``vllm_args.model_runner``).
    model_runner: str = option(
        "auto",
        Rule(
            choices=MODEL_RUNNERS,
            expected="auto, v2 or v1",
            needs_gpu=gpu_only("v2", "--model-runner v2 needs a CUDA GPU (vLLM's Model Runner V2 runs Triton kernels)"),
        ),
    )

    def __post_init__(self) -> None:
        for f in fields(EngineOptions):  # Typer hands floats, Python callers ints: one value
            value = getattr(self, f.name)
            if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))

    def check(self, use_gpu: bool | Callable[[], bool] = True) -> None:
        """Every option's rule, then what needs a CUDA GPU; ``use_gpu`` (or a function answering it,
        asked only when some value needs one) says whether the engine will have one."""
        for f in fields(EngineOptions):
            f.metadata["rule"].check(flag(f.name), getattr(self, f.name))
        for f in fields(EngineOptions):
            needs_gpu = f.metadata["rule"].needs_gpu
            message = needs_gpu(getattr(self, f.name)) if needs_gpu else None
            if message and not (use_gpu() if callable(use_gpu) else use_gpu):
                raise EngineOptionError(message)

    def options(self) -> dict[str, Any]:
        """The options alone, as keywords (of ``EngineOptions``, ``EngineConfig`` or ``CaptionSpec.build``)."""
        return {f.name: getattr(self, f.name) for f in fields(EngineOptions)}

    def identity(self) -> dict[str, Any]:
        """The options that change what is generated and are set: they join the run key."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(EngineOptions)
            if f.metadata["identity"] and getattr(self, f.name) != f.default
        }


ENGINE_OPTIONS = tuple(f.name for f in fields(EngineOptions))


@dataclass(frozen=True, kw_only=True)
class EngineConfig(EngineOptions):
    """The caller's ``EngineOptions`` plus what the run sizes and decides: the model, the longest chunk,
    the token budget, the seed, the replicas' devices and the in-flight caps."""

    model: str
    family: ModelFamily
    max_chunk_s: float
    max_tokens: int = 512
    prompt_budget: int = 1024  # text tokens a prompt may take besides its audio
    seed: int = 0
    # Requests kept in the engine at once: None = the engine's batch cap (max_num_seqs: 512 on a GPU,
    # vllm_args.GPU_MAX_NUM_SEQS; vLLM's 256 on the CPU) and a quarter more waiting (``in_flight_cap``);
    # the audio cap bounds memory.
    max_in_flight: int | None = None
    max_in_flight_audio_s: float = 4 * 3600.0
    verbose: bool = False
    mm_cache_gb: float = 0.0  # vLLM's multimodal processor cache (GiB): > 0 only when a run asks each chunk twice
    extra: dict[str, Any] = field(default_factory=dict)
    # One entry per engine replica: its CUDA_VISIBLE_DEVICES, or None (no pinning, e.g. CPU). Two or
    # more run data parallel in worker processes (flamingo_cli/data_parallel.py); () or one entry runs
    # the engine in this process.
    devices: tuple[str | None, ...] = ()
    # torch's CPU threads in each data-parallel replica process, where its vLLM front-end computes every
    # request's log-mel (21-29 ms of CPU per 30-s window, one thread); None keeps torch's default, one per
    # core of the host in every replica. A cap is a candidate fix for multi-GPU scaling, not yet measured
    # on GPUs, so it is not the default (BENCHMARKS.md, "Scale-out").
    replica_threads: int | None = None

    @property
    def windows(self) -> int:
        """30-s encoder windows of the longest chunk."""
        return max(1, math.ceil(round(self.max_chunk_s, 3) / WINDOW_S))

    @property
    def max_model_len(self) -> int:
        """Audio tokens of the longest chunk (+ MF's BOS/EOS) + prompt text + generated tokens."""
        return self.windows * TOKENS_PER_WINDOW + 2 + self.prompt_budget + self.max_tokens
