"""flamingo's engine options as vLLM's engine arguments and environment: one place for the in-process
engine, its data-parallel replicas and the Ray path. Imports neither torch nor vLLM."""

from __future__ import annotations

from typing import Any

from flamingo_cli.engine_options import EngineConfig
from flamingo_cli.models import WINDOW_S
from flamingo_cli.records import SAMPLE_RATE

GPU_MAX_NUM_BATCHED_TOKENS = 32768
# The running batch on a GPU: vLLM captures CUDA graphs for decode batches up to 512 sequences
# (``max_cudagraph_capture_size``: min(512, 2 × max_num_seqs)), and its default max_num_seqs on an
# H100/H200 is 1024: a batch of 513-1024 decodes eagerly, one kernel launch at a time from the engine
# core's thread. 664 10-s clips, the real CLI, one H100 (2026-12-07): 38.8-39.5 rows/s at vLLM's 1024,
# 43.5-48.9 at 512 (benchmarks/2026-12-07-h100-cli-d).
GPU_MAX_NUM_SEQS = 512
# vLLM's step budget on the CPU (its default there); flamingo's CPU engines take at least the model length.
CPU_MIN_BATCHED_TOKENS = 4096


# Structured outputs (--schema): xgrammar, the backend flamingo checks schemas against before a run
# (flamingo_cli/schema.py), and compact JSON: "any whitespace" lets a model spend its token budget on
# blank lines inside the object. vLLM 0.24 takes both per engine, not per request.
STRUCTURED_OUTPUTS_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}


def engine_kwargs(config: EngineConfig, use_gpu: bool) -> dict[str, Any]:
    """vLLM engine arguments for ``config`` (all but ``model``): one place for the local and Ray paths;
    ``EngineOptionError`` for an option that cannot work (``use_gpu``: the engine runs on a GPU)."""
    config.check(use_gpu)
    kwargs: dict[str, Any] = dict(
        max_model_len=config.max_model_len,
        # One audio per prompt; vLLM sizes its profiling run and encoder cache by the longest chunk.
        limit_mm_per_prompt={"audio": {"count": 1, "length": config.windows * WINDOW_S * SAMPLE_RATE}},
        dtype=config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        seed=config.seed,
        # One task: each audio is asked once per run, so a multimodal input cache only costs memory.
        # Several tasks (``--task a --task b``) ask each chunk once per task, back to back: the cache
        # hands the later ones the processed audio (features) instead of redoing it.
        mm_processor_cache_gb=config.mm_cache_gb,
        disable_log_stats=not config.verbose,
        structured_outputs_config=dict(STRUCTURED_OUTPUTS_CONFIG),
    )
    if not compiles(config, use_gpu) and not config.enforce_eager:
        # No torch.compile; on a GPU, decode batches still run as full CUDA graphs (attention backends
        # that cannot capture them fall back as vLLM decides).
        kwargs["compilation_config"] = {"mode": 0, **({"cudagraph_mode": "FULL_DECODE_ONLY"} if use_gpu else {})}
    if config.quantization:
        kwargs["quantization"] = config.quantization
    if config.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = config.kv_cache_dtype
    device = mel_device(config, use_gpu)
    if device:
        kwargs["mm_processor_kwargs"] = {"device": device}
    if not config.trim_encoder:
        from flamingo_cli.vllm_plugin import TRIM_OVERRIDE

        kwargs["hf_overrides"] = {TRIM_OVERRIDE: False}
    if config.max_num_seqs:
        kwargs["max_num_seqs"] = config.max_num_seqs
    elif use_gpu and not config.enforce_eager:
        kwargs["max_num_seqs"] = GPU_MAX_NUM_SEQS
    if config.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    elif use_gpu:
        # Audio prompts are prefill-heavy (750 tokens a window); a larger prefill budget than vLLM's
        # default won on an H100 (BENCHMARKS.md: 30.3 vs 29.1 windows/s).
        kwargs["max_num_batched_tokens"] = GPU_MAX_NUM_BATCHED_TOKENS
    if not use_gpu:
        # On the CPU each prompt is prefilled in one step, never split: vLLM 0.24 rewinds a seeded
        # request's generator after a partial prefill (gpu_model_runner._bookkeeping_sync), which a CPU
        # torch.Generator cannot do ("CPU Generator does not use offset": the engine died on the first
        # sampled chunk longer than its 4,096-token step). vLLM does the same for MLA models on the CPU.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(
            kwargs.get("max_num_batched_tokens") or 0,
            config.max_model_len,
            kwargs.get("max_num_seqs") or 0,  # vLLM wants a step to hold one token of every sequence
            CPU_MIN_BATCHED_TOKENS,
        )
    kwargs.update(config.extra)
    return kwargs


def compiles(config: EngineConfig, use_gpu: bool) -> bool:
    """Whether vLLM torch.compiles the language model: ``--compile``/``--no-compile``, else not on a GPU."""
    return config.compile if config.compile is not None else not use_gpu


def mel_device(config: EngineConfig, use_gpu: bool) -> str | None:
    """Where the processor computes the log-mel features: None for its default (the CPU)."""
    device = ("cuda" if use_gpu else None) if config.mel_device == "auto" else config.mel_device
    return device if device and device != "cpu" else None


def engine_env(config: EngineConfig, use_gpu: bool = False) -> dict[str, str]:
    """The environment variables vLLM reads its options from (the local engine sets them unless the
    user did; the Ray path puts them in its workers' runtime env)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(int(max(1, config.cpu_kv_cache_gb))),
        "VLLM_USE_V2_MODEL_RUNNER": "1" if model_runner(config, use_gpu) == "v2" else "0",
    }


# Model Runner V2 on a GPU unless measured otherwise (set by the lease's A/B, BENCHMARKS.md).
V2_ON_GPU = False


def model_runner(config: EngineConfig, use_gpu: bool) -> str:
    """vLLM's model runner for ``config``: ``--model-runner``, else V2 on a GPU where it measured
    faster (``V2_ON_GPU``), V1 on the CPU (V2 runs Triton kernels)."""
    if config.model_runner != "auto":
        return config.model_runner
    return "v2" if use_gpu and V2_ON_GPU else "v1"
