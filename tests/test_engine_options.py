"""Engine options that reach vLLM: FP8 switches checked before a model loads, sizes from the longest chunk."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from flamingo_cli.engine import EngineConfig, in_flight_cap
from flamingo_cli.engine_options import EngineOptionError, EngineOptions, flag
from flamingo_cli.models import AF3, MF
from flamingo_cli.spec import CaptionSpec, SpecError
from flamingo_cli.vllm_args import GPU_MAX_NUM_SEQS, engine_env, engine_kwargs


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="m", family=AF3, max_chunk_s=30.0, **kw)


def test_fp8_is_off_by_default_and_passed_through_when_asked():
    kwargs = engine_kwargs(_config(), use_gpu=True)
    assert "quantization" not in kwargs and "kv_cache_dtype" not in kwargs
    kwargs = engine_kwargs(_config(quantization="fp8", kv_cache_dtype="fp8"), use_gpu=True)
    assert kwargs["quantization"] == "fp8" and kwargs["kv_cache_dtype"] == "fp8"


def test_no_compile_keeps_decode_in_cuda_graphs_on_a_gpu():
    assert "compilation_config" not in engine_kwargs(_config(compile=True), use_gpu=True)  # vLLM's default
    gpu = engine_kwargs(_config(compile=False), use_gpu=True)["compilation_config"]
    assert gpu == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    # the default: no compile on a GPU (measured as fast, a shorter start), vLLM's own on the CPU
    assert engine_kwargs(_config(), use_gpu=True)["compilation_config"] == gpu
    assert "compilation_config" not in engine_kwargs(_config(), use_gpu=False)
    assert engine_kwargs(_config(compile=False), use_gpu=False)["compilation_config"] == {"mode": 0}
    eager = engine_kwargs(_config(compile=False, enforce_eager=True), use_gpu=True)
    assert eager["enforce_eager"] is True and "compilation_config" not in eager


def test_the_gpu_batch_stays_within_vllms_cuda_graphs():
    """On a GPU the running batch is capped at vLLM's largest CUDA graph (512), not its 1024 default;
    --max-num-seqs overrides it; eager engines and the CPU keep vLLM's own default."""
    assert engine_kwargs(_config(), use_gpu=True)["max_num_seqs"] == GPU_MAX_NUM_SEQS == 512
    assert engine_kwargs(_config(max_num_seqs=1024), use_gpu=True)["max_num_seqs"] == 1024
    assert "max_num_seqs" not in engine_kwargs(_config(enforce_eager=True), use_gpu=True)
    assert "max_num_seqs" not in engine_kwargs(_config(), use_gpu=False)
    assert engine_kwargs(_config(max_num_seqs=8), use_gpu=False)["max_num_seqs"] == 8
    # and flamingo keeps that batch and a quarter more in flight
    assert in_flight_cap(None, engine_kwargs(_config(), use_gpu=True)["max_num_seqs"]) == 640


def test_on_the_cpu_each_prompt_is_prefilled_in_one_step():
    """vLLM 0.24 kills a CPU engine that splits a seeded request's prefill (it cannot rewind a CPU
    generator), so there every prompt fits one step and chunked prefill is off; a GPU keeps both."""
    short, capped = _config(), EngineConfig(model="m", family=AF3, max_chunk_s=600.0)
    assert capped.max_model_len > 4096 > short.max_model_len
    cpu = engine_kwargs(capped, use_gpu=False)
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == capped.max_model_len
    assert engine_kwargs(short, use_gpu=False)["max_num_batched_tokens"] == 4096  # vLLM's CPU default, at least
    # a larger budget asked for is kept; a smaller one is raised to the model length (each prompt whole)
    assert engine_kwargs(_config(max_num_batched_tokens=50000), use_gpu=False)["max_num_batched_tokens"] == 50000
    assert (
        engine_kwargs(dataclasses.replace(capped, max_num_batched_tokens=1024), use_gpu=False)["max_num_batched_tokens"]
        == capped.max_model_len
    )
    gpu = engine_kwargs(capped, use_gpu=True)
    assert "enable_chunked_prefill" not in gpu and gpu["max_num_batched_tokens"] == 32768


def test_fp8_weights_on_cpu_is_a_usage_error_naming_the_reason():
    with pytest.raises(EngineOptionError, match="needs a CUDA GPU"):
        _config(quantization="fp8").check(use_gpu=False)
    _config(kv_cache_dtype="fp8").check(use_gpu=False)  # vLLM's CPU attention has an FP8 KV cache


@pytest.mark.parametrize(("field", "value"), [("quantization", "int3"), ("kv_cache_dtype", "fp4")])
def test_unknown_fp8_option_values_are_rejected(field, value):
    with pytest.raises(EngineOptionError, match=value):
        _config(**{field: value}).check(use_gpu=True)


@pytest.mark.parametrize(("seconds", "windows"), [(10.0, 1), (30.0, 1), (30.5, 2), (300.0, 10), (600.0, 20)])
def test_engine_is_sized_by_the_longest_chunk(seconds, windows):
    config = EngineConfig(model="m", family=AF3, max_chunk_s=seconds, max_tokens=128)
    kwargs = engine_kwargs(config, use_gpu=False)
    assert config.windows == windows
    assert kwargs["max_model_len"] == windows * 750 + 2 + config.prompt_budget + 128
    # vLLM's memory profiling and encoder cache take the longest chunk's audio, not the model's cap.
    assert kwargs["limit_mm_per_prompt"] == {"audio": {"count": 1, "length": windows * 30 * 16000}}
    assert EngineConfig(model="m", family=MF, max_chunk_s=1200.0).windows == 40


def test_cli_fp8_on_a_cpu_host_is_a_usage_error_before_any_model_loads(tmp_path, tiny_af3):
    import torch
    from conftest import make_audio, run_cli

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: fp8 is allowed")
    make_audio(tmp_path / "in" / "a.wav", 2.0)
    res = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "out", "--model", tiny_af3, "--quantization", "fp8"])
    assert res.status == 2, res.stderr
    assert "--quantization fp8 needs a CUDA GPU" in res.stderr


def test_spec_carries_the_speed_options_to_the_engine(tmp_path, tiny_af3):
    from flamingo_cli.spec import CaptionSpec

    spec = CaptionSpec.build([str(tmp_path)], tmp_path / "out", model=str(tiny_af3))
    config = spec.engine_config()
    assert config.trim_encoder and config.quantization is None and config.kv_cache_dtype == "auto"
    spec = CaptionSpec.build(
        [str(tmp_path)], tmp_path / "out", model=str(tiny_af3), trim_encoder=False, kv_cache_dtype="fp8"
    )
    config = spec.engine_config()
    assert not config.trim_encoder and config.kv_cache_dtype == "fp8"


def test_the_plan_before_the_engine_finds_the_longest_chunk(tmp_path, tiny_af3):
    """``lifecycle.survey``: the work and its longest chunk (what a GPU engine is sized by), found before vLLM
    starts; ``size=False`` (a CPU engine keeps the cap) stops at the first file with work."""
    from conftest import make_audio

    from flamingo_cli.lifecycle import survey
    from flamingo_cli.resume import ResumeIndex
    from flamingo_cli.spec import CaptionSpec

    for name, seconds in (("a.wav", 5.0), ("b.wav", 47.0), ("c.wav", 12.0)):
        make_audio(tmp_path / "in" / name, seconds)
    spec = CaptionSpec.build([str(tmp_path / "in")], tmp_path / "out", model=str(tiny_af3))
    found = survey(spec, ResumeIndex())
    assert (found.todo, found.errors, found.complete, found.seen) == (3, 0, True, 3)
    assert found.longest_chunk_s == pytest.approx(47.0, abs=0.01)  # whole files: AF3's cap is 600 s
    chunked = CaptionSpec.build([str(tmp_path / "in")], tmp_path / "out", model=str(tiny_af3), chunk_seconds=20)
    # b.wav's 20-s chunks reach the run's own cap: the walk stops there and the engine is sized for it.
    assert chunked.max_chunk_s == 20.0 and survey(chunked, ResumeIndex()).longest_chunk_s is None
    quick = survey(spec, ResumeIndex(), size=False)
    assert (quick.todo, quick.complete, quick.longest_chunk_s, quick.seen) == (1, False, None, 1)


# -- every engine option, generically: adding one is a field of EngineOptions and its Typer option ------

ENGINE_FIELDS = dataclasses.fields(EngineOptions)


def _other_value(f: dataclasses.Field) -> Any:
    """A valid value of option ``f`` other than its default, from its rule."""
    rule = f.metadata["rule"]
    if rule.boolean:
        return not f.default
    if rule.choices:
        return next(c for c in rule.choices if c != f.default)
    if rule.integer:
        return int(f.default or rule.lo or 0) + 1
    if rule.hi is not None:
        return (rule.lo + rule.hi) / 2
    return f.default * 2


def _cli_args(param: Any, value: Any) -> list[str]:
    if param.is_flag:
        return [param.opts[0] if value else param.secondary_opts[0]]
    return [param.opts[0], str(value)]


@pytest.mark.parametrize("f", ENGINE_FIELDS, ids=lambda f: f.name)
def test_every_engine_option_is_a_caption_cli_option_of_the_same_name(f):
    import typer.main

    from flamingo_cli.cli import app

    command = typer.main.get_command(app).commands["caption"]
    params = {p.name: p for p in command.params}
    assert f.name in params, f"EngineOptions.{f.name} has no `flamingo caption` option"
    param = params[f.name]
    assert flag(f.name) in param.opts and param.default == f.default
    value = _other_value(f)
    ctx = command.make_context("caption", ["in", "--out", "o", *_cli_args(param, value)])
    assert ctx.params[f.name] == value  # cli.caption hands every parameter to api.caption by its name


@pytest.mark.parametrize("f", ENGINE_FIELDS, ids=lambda f: f.name)
def test_every_engine_option_reaches_the_engine_and_not_the_run_key(tmp_path, f):
    """CaptionSpec.build takes it by name, EngineConfig carries it, engine_kwargs or engine_env hands it to
    vLLM, and it joins the run key only if it is marked as changing what is generated (none is today)."""
    value = _other_value(f)
    # executor="ray": the values are checked, not this host's GPUs (tensor parallel, FP8 weights).
    base = CaptionSpec.build([str(tmp_path)], tmp_path / "out", model="af3", executor="ray")
    spec = CaptionSpec.build([str(tmp_path)], tmp_path / "out", model="af3", executor="ray", **{f.name: value})
    assert getattr(spec.engine_options, f.name) == value
    config = spec.engine_config()
    assert isinstance(config, EngineOptions) and getattr(config, f.name) == value
    default = base.engine_config()
    reaches = ({**engine_kwargs(c, use_gpu=True), **engine_env(c, use_gpu=True)} for c in (default, config))
    assert next(reaches) != next(reaches), f"{f.name}={value!r} changes nothing vLLM gets"
    if f.metadata["identity"]:
        assert spec.identity()[f.name] == value and spec.run_key != base.run_key
    else:
        assert f.name not in spec.identity() and spec.run_key == base.run_key


@pytest.mark.parametrize("f", ENGINE_FIELDS, ids=lambda f: f.name)
def test_flamingo_caption_checks_every_engine_option_before_any_model_loads(tmp_path, f):
    """The Python API routes the keyword into the options and a bad value is a SpecError naming the
    option as the CLI spells it; the injected engine is never asked for anything."""
    from fakes import FakeEngine

    import flamingo_cli

    engine = FakeEngine()
    with pytest.raises(SpecError, match=re.escape(flag(f.name))):
        flamingo_cli.caption([str(tmp_path)], tmp_path / "out", engine=engine, model="af3", **{f.name: "bad"})
    assert engine.requests == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp64"}, "--dtype 'fp64': expected one of auto, bfloat16, float16, float32, half, float"),
        ({"gpu_memory_utilization": 0}, "--gpu-memory-utilization 0.0: expected a number > 0 and ≤ 1"),
        ({"tensor_parallel_size": 0}, "--tensor-parallel-size 0: expected an integer ≥ 1"),
        ({"max_num_seqs": 1.5}, "--max-num-seqs 1.5: expected an integer ≥ 1"),
        ({"mel_device": "tpu"}, "--mel-device 'tpu': expected auto, cpu or cuda"),
        ({"quantization": "int3"}, "--quantization 'int3': expected one of fp8"),
        ({"kv_cache_dtype": "fp4"}, "--kv-cache-dtype 'fp4': expected one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    ],
)
def test_engine_option_messages(tmp_path, options, message):
    with pytest.raises(SpecError) as info:
        CaptionSpec.build([str(tmp_path)], tmp_path / "out", model="af3", **options)
    assert str(info.value) == message
