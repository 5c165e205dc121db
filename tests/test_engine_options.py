"""Engine options that reach vLLM: FP8 switches checked before a model loads, sizes from the longest chunk."""

from __future__ import annotations

import pytest

from flamingo_cli.engine import EngineConfig, EngineOptionError, check_options, engine_kwargs
from flamingo_cli.models import AF3, MF


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="m", family=AF3, max_chunk_s=30.0, **kw)


def test_fp8_is_off_by_default_and_passed_through_when_asked():
    kwargs = engine_kwargs(_config(), use_gpu=True)
    assert "quantization" not in kwargs and "kv_cache_dtype" not in kwargs
    kwargs = engine_kwargs(_config(quantization="fp8", kv_cache_dtype="fp8"), use_gpu=True)
    assert kwargs["quantization"] == "fp8" and kwargs["kv_cache_dtype"] == "fp8"


def test_fp8_weights_on_cpu_is_a_usage_error_naming_the_reason():
    with pytest.raises(EngineOptionError, match="needs a CUDA GPU"):
        check_options(_config(quantization="fp8"), use_gpu=False)
    check_options(_config(kv_cache_dtype="fp8"), use_gpu=False)  # vLLM's CPU attention has an FP8 KV cache


@pytest.mark.parametrize(("field", "value"), [("quantization", "int3"), ("kv_cache_dtype", "fp4")])
def test_unknown_fp8_option_values_are_rejected(field, value):
    with pytest.raises(EngineOptionError, match=value):
        check_options(_config(**{field: value}), use_gpu=True)


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
    from flamingo_cli.sink import ResumeIndex
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
