"""flamingo's vLLM plugin: trimmed audio-tower windows give vLLM's untrimmed outputs (CPU, fp32).

The module-level tests run vLLM 0.24's own AF3 encoder on a tiny checkpoint's weights, with features
from the real processor, and compare flamingo's trimmed path against vLLM's untrimmed one
(``AudioFlamingo3ForConditionalGeneration._encode_audio_features``). Greedy tokens through the real
engine with trimming on (the default) are checked against transformers by tests/test_parity.py.
"""

from __future__ import annotations

import pytest

from flamingo_cli.parity import Case
from flamingo_cli.vllm_plugin import ARCHITECTURES, encode_trimmed, plan_groups

SECONDS = [1.0, 10.0, 29.99, 30.0, 31.0, 600.0, 30.01]  # 30.01 s: a 160-sample tail, 1 frame


def test_groups_cover_every_window_once_and_batch_equal_lengths():
    lengths = [500, 1500, 3, 500, 1500, 1, 499, 1500, 0]
    groups = plan_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    group_of = {i: k for k, g in enumerate(groups) for i in g}
    assert group_of[1] == group_of[4] == group_of[7]  # equal lengths never split
    assert group_of[0] == group_of[3] == group_of[6]  # 499 pads by one position rather than run alone
    assert group_of[1] != group_of[0]  # full windows are not padded onto 10-s ones
    assert plan_groups(lengths, overhead=10**9) == [sorted(range(len(lengths)), key=lambda i: lengths[i])]
    assert plan_groups([]) == []


@pytest.fixture(scope="module")
def tower_and_features(tiny_af3):
    """vLLM's AF3 encoder with the tiny checkpoint's weights, and the processor's windows for SECONDS."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor
    from vllm.model_executor.models.audioflamingo3 import AudioFlamingo3Encoder

    config = AutoConfig.from_pretrained(tiny_af3)
    tower = AudioFlamingo3Encoder(config.audio_config).eval()
    state = {k.removeprefix("audio_tower."): v for k, v in load_file(tiny_af3 / "model.safetensors").items()}
    missing, _ = tower.load_state_dict({k: v for k, v in state.items() if k in tower.state_dict()}, strict=False)
    assert not missing
    processor = AutoProcessor.from_pretrained(tiny_af3)
    audios = [Case(f"{s}", s, "", seed=i).samples() for i, s in enumerate(SECONDS)]
    inputs = processor(text=["<sound>"] * len(audios), audio=audios, return_tensors="pt")
    features, mask = inputs["input_features"].to(torch.float32), inputs["input_features_mask"]
    return tower, features, mask


def _untrimmed(tower, features, mask):
    """vLLM 0.24's own encoder call, exactly as its model class makes it."""
    from types import SimpleNamespace

    from vllm.model_executor.models.audioflamingo3 import AudioFlamingo3ForConditionalGeneration

    return AudioFlamingo3ForConditionalGeneration._encode_audio_features(
        SimpleNamespace(audio_tower=tower), features, mask
    )


def test_trimmed_encoder_equals_untrimmed_on_valid_outputs(tower_and_features):
    import torch

    tower, features, mask = tower_and_features
    lengths = mask.sum(-1)
    # 1 s, 10 s, 29.99 s are short windows; 31 s ends in a 1-s tail; 600 s is 20 full windows; 30.01 s
    # ends in one frame, which yields no sound token (and runs alone: nothing to pool).
    assert sorted(set(lengths.tolist())) == [1, 100, 1000, 2999, 3000]
    with torch.inference_mode():
        ref = _untrimmed(tower, features, mask)
        got = encode_trimmed(tower, features, lengths)
    assert got.shape == ref.shape == (features.shape[0], 750, tower.layer_norm.normalized_shape[0])
    valid = (lengths - 1) // 2 + 1
    valid = (valid - 2) // 2 + 1  # post-pool outputs, as vLLM counts the sound tokens
    assert sorted(set(valid.tolist())) == [0, 25, 250, 750]
    for i, n in enumerate(valid.tolist()):
        diff = (got[i, :n] - ref[i, :n]).abs().max().item() if n else 0.0
        assert diff < 2e-5 * max(1.0, ref[i, :n].abs().max().item() if n else 0.0), (i, n, diff)
        assert not got[i, n:].any()  # outputs past the valid ones are never filled


def test_trimmed_encoder_is_independent_of_batch_company(tower_and_features):
    """A window's output does not depend on which other windows share its batch (groups pad with masks)."""
    import torch

    tower, features, mask = tower_and_features
    lengths = mask.sum(-1)
    with torch.inference_mode():
        together = encode_trimmed(tower, features, lengths)
        for i in (0, 1, 2, len(lengths) - 2, len(lengths) - 1):
            alone = encode_trimmed(tower, features[i : i + 1], lengths[i : i + 1])
            assert torch.allclose(alone[0], together[i], atol=2e-5), i


def test_short_window_costs_a_third_of_the_positions(tower_and_features):
    """10 s of audio runs 501 encoder positions, not 1500: the FLOPs saving the feature exists for."""
    from flamingo_cli.vllm_plugin import conv_lengths

    _, _, mask = tower_and_features
    assert conv_lengths(int(mask[1].sum())) == 500
    assert conv_lengths(3000) == 1500


def test_plugin_registers_flamingo_classes_for_both_architectures():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    for arch, target in ARCHITECTURES.items():
        cls = ModelRegistry._try_load_model_cls(arch)  # loads the lazily registered class
        assert f"{cls.__module__}:{cls.__name__}" == target
        assert hasattr(cls, "_processor_factory")  # vLLM's multimodal processor is inherited


def test_trimming_opt_outs(monkeypatch):
    from types import SimpleNamespace

    from flamingo_cli.engine import EngineConfig, engine_kwargs
    from flamingo_cli.models import AF3
    from flamingo_cli.vllm_plugin import TRIM_ENV, TRIM_OVERRIDE, trim_enabled

    assert trim_enabled(SimpleNamespace()) and trim_enabled(None)
    assert not trim_enabled(SimpleNamespace(**{TRIM_OVERRIDE: False}))
    config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0)
    assert "hf_overrides" not in engine_kwargs(config, use_gpu=False)  # on by default: the checkpoint's config as is
    off = engine_kwargs(EngineConfig(model="m", family=AF3, max_chunk_s=30.0, trim_encoder=False), use_gpu=False)
    assert off["hf_overrides"] == {TRIM_OVERRIDE: False}
    monkeypatch.setenv(TRIM_ENV, "0")
    assert not trim_enabled(None)
