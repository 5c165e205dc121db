"""vLLM behind a narrow interface: a feed of Requests in, Results out as they finish.

The engine pulls requests from a bounded queue while it has room (in-flight requests and audio seconds
are both capped, so host memory stays bounded for any dataset) and steps vLLM's continuous-batching
engine in between, so chunks of all files share batches. A multi-GPU or Ray executor can stand behind
the same ``Engine`` protocol. vLLM and torch are imported here only, and only when an engine starts.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flamingo_cli.models import TOKENS_PER_WINDOW, WINDOW_S, ModelFamily
from flamingo_cli.quiet import engine_log_path, log_tail, quiet_env, redirect_fds, remove_quietly
from flamingo_cli.reasoning import with_reasoning
from flamingo_cli.records import SAMPLE_RATE, Request, Result, Sampling

END = None  # put on a feed to say no more requests will come


class EngineError(Exception):
    """The engine could not start or died; the run's finished rows are kept."""


@dataclass(frozen=True)
class EngineConfig:
    model: str
    family: ModelFamily
    max_chunk_s: float
    max_tokens: int = 512
    prompt_budget: int = 1024  # text tokens a prompt may take besides its audio
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    cpu_kv_cache_gb: float = 2.0
    max_in_flight: int = 512
    max_in_flight_audio_s: float = 4 * 3600.0
    verbose: bool = False
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
    def max_model_len(self) -> int:
        """Audio tokens of the longest chunk (+ MF's BOS/EOS) + prompt text + generated tokens."""
        windows = -(-int(self.max_chunk_s) // WINDOW_S)
        return windows * TOKENS_PER_WINDOW + 2 + self.prompt_budget + self.max_tokens


class Engine(Protocol):
    def run(self, feed: queue.Queue, sampling: Sampling) -> Iterator[Result]:
        """Take Requests from ``feed`` until END; yield one Result per Request, in finish order."""
        ...

    def close(self) -> None: ...


def request_seed(base: int, request: Request) -> int:
    """A per-request seed from the run seed and the chunk key: sampling never depends on batching."""
    digest = hashlib.sha256(f"{base}\0{request.chunk.item.id}\0{request.chunk.index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class VllmEngine:
    """vLLM's offline engine (``LLM``), fed incrementally through ``llm_engine.add_request``/``step``."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, config.cpu_kv_cache_gb))))
        # Without --verbose vLLM's output (its processes' logs and load bars) goes to a log file, not the
        # terminal; see flamingo_cli/quiet.py. The file is removed at exit, kept when the start fails.
        self.log_path = None if config.verbose else engine_log_path()
        if self.log_path is not None:
            quiet_env()
        with contextlib.nullcontext() if self.log_path is None else redirect_fds(self.log_path):
            self.llm, start_error = self._start(config)
        if start_error is not None:
            tail = log_tail(self.log_path) if self.log_path is not None else ""
            where = f"\n--- vLLM's log ({self.log_path}), last lines ---\n{tail}" if tail.strip() else ""
            raise EngineError(f"vLLM could not load {config.model}: {start_error}{where}")
        if self.log_path is not None:
            atexit.register(remove_quietly, self.log_path)
        self._engine = self.llm.llm_engine
        self.defaults = self.llm.get_default_sampling_params()
        self._counter = 0
        self.versions = engine_versions()

    @staticmethod
    def _start(config: EngineConfig) -> tuple[Any, str | None]:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the install flavour
            raise EngineError(f"vLLM is not installed ({exc}); install flamingo with the 'gpu' or 'cpu' extra") from exc
        kwargs: dict[str, Any] = {"model": config.model, **engine_kwargs(config, _has_cuda())}
        if not config.verbose:
            kwargs.setdefault("use_tqdm_on_load", False)  # its explicit disable= ignores TQDM_DISABLE
        try:
            return LLM(**kwargs), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def sampling_params(self, sampling: Sampling, request: Request | None = None):
        params = self.defaults.clone()
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(sampling, name)
            if value is not None:
                setattr(params, name, value)
        params.max_tokens = sampling.max_tokens
        params.ignore_eos = sampling.ignore_eos
        if request is not None and params.temperature > 0:
            params.seed = request_seed(self.config.seed if sampling.seed is None else sampling.seed, request)
        return params

    def effective_sampling(self, sampling: Sampling) -> dict[str, Any]:
        p = self.sampling_params(sampling)
        return {
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "repetition_penalty": p.repetition_penalty,
            "max_tokens": p.max_tokens,
            "seed": self.config.seed if sampling.seed is None else sampling.seed,
            "ignore_eos": p.ignore_eos,
        }

    def _add(self, request: Request, sampling: Sampling) -> str:
        self._counter += 1
        rid = f"r{self._counter}"
        samples = request.chunk.samples
        self._engine.add_request(
            rid,
            {"prompt": request.text, "multi_modal_data": {"audio": (samples, SAMPLE_RATE)}},
            self.sampling_params(sampling, request),
        )
        return rid

    def run(self, feed: queue.Queue, sampling: Sampling, on_step: Callable[[], None] | None = None) -> Iterator[Result]:
        pending: dict[str, Request] = {}
        audio_s = 0.0
        done = False
        cfg = self.config
        while True:
            # Fill: block only when nothing is running, so the engine never waits on the feed.
            while not done and len(pending) < cfg.max_in_flight and audio_s < cfg.max_in_flight_audio_s:
                try:
                    request = feed.get(block=not pending, timeout=0.2)
                except queue.Empty:
                    if pending:
                        break
                    if on_step:
                        on_step()
                    continue
                if request is END:
                    done = True
                    break
                try:
                    rid = self._add(request, sampling)
                except Exception as exc:
                    yield Result(chunk=request.chunk, prompt=request.prompt, error=f"rejected by the engine: {exc}")
                    continue
                pending[rid] = request
                audio_s += request.chunk.end_s - request.chunk.start_s
            if not pending:
                if done:
                    return
                continue
            try:
                outputs = self._engine.step()
            except Exception as exc:
                raise EngineError(f"the vLLM engine failed: {type(exc).__name__}: {exc}") from exc
            if on_step:
                on_step()
            for out in outputs:
                if not out.finished:
                    continue
                request = pending.pop(out.request_id, None)
                if request is None:
                    continue
                audio_s -= request.chunk.end_s - request.chunk.start_s
                completion = out.outputs[0]
                result = Result(
                    chunk=request.chunk,
                    prompt=request.prompt,
                    caption=completion.text,
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    output_tokens=len(completion.token_ids),
                    prompt_token_ids=list(out.prompt_token_ids or []),
                    token_ids=list(completion.token_ids),
                )
                yield with_reasoning(result, self.config.family.think)

    def abort_all(self) -> None:
        with contextlib.suppress(Exception):
            self._engine.abort_request(list(self._engine.output_processor.request_states))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        self._engine = None
        with contextlib.suppress(Exception):
            core = llm.llm_engine.engine_core
            core.shutdown()
            # Requests vLLM's client still holds would otherwise be freed at interpreter exit.
            pending = getattr(core, "pending_messages", None)
            if pending is not None:
                pending.clear()
        del llm
        import gc

        gc.collect()


GPU_MAX_NUM_BATCHED_TOKENS = 32768


def engine_kwargs(config: EngineConfig, use_gpu: bool) -> dict[str, Any]:
    """vLLM engine arguments for ``config`` (all but ``model``): one place for the local and Ray paths."""
    kwargs: dict[str, Any] = dict(
        max_model_len=config.max_model_len,
        limit_mm_per_prompt={"audio": 1},
        dtype=config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        # Each audio is captioned once per run: a multimodal input cache only costs memory.
        mm_processor_cache_gb=0,
        disable_log_stats=not config.verbose,
    )
    if config.max_num_seqs:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if config.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    elif use_gpu:
        # Audio prompts are prefill-heavy (750 tokens a window); a larger prefill budget than vLLM's
        # default won on an H100 (BENCHMARKS.md: 30.3 vs 29.1 windows/s).
        kwargs["max_num_batched_tokens"] = GPU_MAX_NUM_BATCHED_TOKENS
    kwargs.update(config.extra)
    return kwargs


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def engine_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in ("vllm", "torch", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version("vllm-cpu" if name == "vllm" and _is_cpu_build() else name)
        except Exception:
            versions[name] = "unknown"
    return versions


def _is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


_CACHE: dict[tuple, Any] = {}


def get_engine(config: EngineConfig) -> Any:
    """One engine per configuration per process: an engine takes ~1 min to start, so reuse it.

    Two or more ``config.devices`` give a ``DataParallelEngine`` (one replica process each); one
    device pins this process's engine to it (``CUDA_VISIBLE_DEVICES``, set before vLLM loads).
    """
    key = tuple(sorted((k, repr(v)) for k, v in asdict(config).items()))
    engine = _CACHE.get(key)
    if engine is None or engine.llm is None:
        t0 = time.perf_counter()
        if len(config.devices) > 1:
            from flamingo_cli.data_parallel import DataParallelEngine

            engine = DataParallelEngine(config, config.devices)
        else:
            if config.devices and config.devices[0] is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = config.devices[0]
            engine = VllmEngine(config)
        if not _CACHE:
            atexit.register(close_all)
        engine.start_seconds = time.perf_counter() - t0
        _CACHE[key] = engine
    return engine


def close_all() -> None:
    for engine in _CACHE.values():
        engine.close()
    _CACHE.clear()
