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
        # vLLM's multimodal processor, made to send compact features
        processor = cls._processor_factory.processor
        assert processor.__name__.startswith("Compacting") and processor.__mro__[1].__name__.endswith("Processor")


def test_trimming_opt_outs(monkeypatch):
    from types import SimpleNamespace

    from flamingo_cli.engine import EngineConfig
    from flamingo_cli.models import AF3
    from flamingo_cli.vllm_args import engine_kwargs
    from flamingo_cli.vllm_plugin import TRIM_ENV, TRIM_OVERRIDE, trim_enabled

    assert trim_enabled(SimpleNamespace()) and trim_enabled(None)
    assert not trim_enabled(SimpleNamespace(**{TRIM_OVERRIDE: False}))
    config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0)
    assert "hf_overrides" not in engine_kwargs(config, use_gpu=False)  # on by default: the checkpoint's config as is
    off = engine_kwargs(EngineConfig(model="m", family=AF3, max_chunk_s=30.0, trim_encoder=False), use_gpu=False)
    assert off["hf_overrides"] == {TRIM_OVERRIDE: False}
    monkeypatch.setenv(TRIM_ENV, "0")
    assert not trim_enabled(None)


def _vllm_flat_batch(tensors):
    """What vLLM's engine core makes of one step's requests (its flat field's own reduction)."""
    from vllm.multimodal.inputs import MultiModalFlatField

    return MultiModalFlatField(slices=[], dim=0)._reduce_data(list(tensors), pin_memory=False)


def test_compact_features_leave_the_trimmed_encoder_outputs_unchanged(tower_and_features):
    """Each request cut to the frames the trimmed encoder reads, batched as vLLM batches them (zero-padded
    to the step's longest) and padded back to the window: the encoder's outputs are the full features'."""
    import torch

    from flamingo_cli.vllm_plugin import compact_features, conv_lengths, frames_read, pad_frames

    tower, features, mask = tower_and_features
    lengths = mask.sum(-1)
    parts = [
        compact_features({"input_features": features[i : i + 1], "feature_attention_mask": mask[i : i + 1]})
        for i in range(len(lengths))
    ]
    kept = [p["input_features"].shape[-1] for p in parts]
    assert kept == [frames_read(conv_lengths(int(n)), 3000) for n in lengths] and kept[1] == 1001  # 10 s: a third
    assert all(
        int(p["feature_attention_mask"].sum()) == int(n) for p, n in zip(parts, lengths, strict=True)
    )  # token counts
    batched = _vllm_flat_batch(p["input_features"] for p in parts)
    batched_mask = _vllm_flat_batch(p["feature_attention_mask"] for p in parts)
    assert batched.shape[-1] == max(kept)  # vLLM zero-pads the step to its longest request
    with torch.inference_mode():
        ref = encode_trimmed(tower, features, lengths)
        got = encode_trimmed(tower, pad_frames(batched, 3000), pad_frames(batched_mask, 3000).sum(-1))
    assert torch.equal(got, ref)
    # one 10-s request alone: 1001 frames, padded back by the model
    alone = parts[1]
    with torch.inference_mode():
        got1 = encode_trimmed(tower, pad_frames(alone["input_features"], 3000), lengths[1:2])
    assert torch.equal(got1[0], ref[1])


def test_compact_features_keep_what_the_encoder_reads_and_nothing_is_cast():
    import torch

    from flamingo_cli.vllm_plugin import compact_features

    features = torch.randn(2, 128, 3000, dtype=torch.bfloat16)
    mask = torch.zeros(2, 3000, dtype=torch.int32)
    mask[0, :400], mask[1, :1000] = 1, 1
    out = compact_features({"input_features": features.clone(), "feature_attention_mask": mask})
    assert out["input_features"].is_contiguous() and torch.equal(out["input_features"], features[..., :1001])
    assert out["feature_attention_mask"].dtype == torch.int32 and out["feature_attention_mask"].shape == (2, 1001)
    empty = {"input_features": torch.zeros(0, 128, 3000), "feature_attention_mask": torch.zeros(0, 3000)}
    assert compact_features(dict(empty))["input_features"].shape == (0, 128, 3000)
    assert compact_features({"input_ids": torch.zeros(3)}).keys() == {"input_ids"}  # text-only prompts


@pytest.fixture(scope="module")
def vllm_processor(tiny_af3):
    """vLLM's multimodal processor for the tiny AF3, as the engine's front-end builds it (bf16 engine)."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = ModelConfig(model=str(tiny_af3), dtype="bfloat16", max_model_len=4096)
    return MULTIMODAL_REGISTRY.create_processor(config)


def _process(processor, seconds: float):
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    audio = Case(f"{seconds}", seconds, "", seed=3).samples()
    items = processor.info.get_data_parser().parse_mm_data({"audio": [audio]})
    out = processor.apply(ProcessorInputs(prompt="<sound>Describe.", mm_data_items=items), TimingContext())
    return out["prompt_token_ids"], out["mm_kwargs"].get_data()


def test_the_engine_front_end_sends_compact_features(vllm_processor, monkeypatch):
    """vLLM's own processing of a 10-s clip: a third of the frames (bf16: vLLM casts to the model's
    dtype), the same prompt ids; opted out, or with trimming off, the full window."""
    import torch

    from flamingo_cli.vllm_plugin import COMPACT_ENV, TRIM_ENV

    ids, data = _process(vllm_processor, 10.0)
    assert data["input_features"].shape == (1, 128, 1001) and data["input_features"].dtype == torch.bfloat16
    assert int(data["feature_attention_mask"].sum()) == 1000
    for env in (COMPACT_ENV, TRIM_ENV):
        monkeypatch.setenv(env, "0")
        full_ids, full = _process(vllm_processor, 10.0)
        monkeypatch.delenv(env)
        assert full["input_features"].shape == (1, 128, 3000) and full["input_features"].dtype == torch.bfloat16
        assert full_ids == ids  # the same sound-token count
        assert torch.equal(full["input_features"][..., :1001], data["input_features"])
    _, long = _process(vllm_processor, 45.0)  # a full window and a 15-s one: the full window is kept
    assert long["input_features"].shape == (2, 128, 3000) and long["input_features"].dtype == torch.bfloat16


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_model_takes_compact_features_through_vllms_input_checks(arch, tiny_af3, tiny_mf):
    """vLLM's input schema wants 3000-frame windows: the model class pads compact ones back (zeros,
    never read) before vLLM's checks, for a batch tensor and for a list of requests alike."""
    import torch
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    cls = ModelRegistry._try_load_model_cls(arch)
    model = object.__new__(cls)  # no weights needed: only the input parsing runs
    ckpt = tiny_af3 if arch.startswith("AudioFlamingo3") else tiny_mf
    model.__dict__["config"] = AutoConfig.from_pretrained(ckpt)
    features, mask = torch.randn(2, 128, 1001), torch.ones(2, 1001, dtype=torch.int32)
    for feats, masks in ((features, mask), (list(features), list(mask))):
        parsed = model._parse_and_validate_audio_input(
            input_features=feats, feature_attention_mask=masks, chunk_counts=torch.tensor([1, 1])
        )
        got = parsed["input_features"]
        got = torch.stack(got) if isinstance(got, list) else got
        assert got.shape == (2, 128, 3000) and torch.equal(got[..., :1001], features) and not got[..., 1001:].any()
        got_mask = parsed["feature_attention_mask"]
        got_mask = torch.stack(got_mask) if isinstance(got_mask, list) else got_mask
        assert got_mask.shape == (2, 3000) and int(got_mask.sum()) == 2002


def test_the_embedding_split_from_host_lengths_equals_vllms():
    """``group_embeddings`` (slices from lengths read once) gives vLLM's ``_group_audio_embeddings``
    exactly, for windows of every length class and audios of one or several windows."""
    from types import SimpleNamespace

    import torch
    from vllm.model_executor.models.audioflamingo3 import AudioFlamingo3ForConditionalGeneration

    from flamingo_cli.vllm_plugin import group_embeddings

    lengths = [1, 100, 1000, 2999, 3000, 3000, 2]
    mask = torch.zeros(len(lengths), 3000, dtype=torch.int32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    features = torch.randn(len(lengths), 750, 16)
    counts = [1, 1, 2, 1, 2]  # the 2999-frame window opens a 2-window audio, the last audio ends in 2 frames
    ref = AudioFlamingo3ForConditionalGeneration._group_audio_embeddings(SimpleNamespace(), features, mask, counts)
    got = group_embeddings(features, mask.sum(-1), counts)
    assert len(got) == len(ref) == len(counts)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    assert [g.shape[0] for g in got] == [0, 25, 250 + 750, 750, 750 + 0]
    # lengths as a list, counts as a tensor (vLLM hands either)
    again = group_embeddings(features, mask.sum(-1).tolist(), torch.tensor(counts))
    assert all(torch.equal(a, b) for a, b in zip(again, ref, strict=True))


def test_host_masks_keep_the_masks_and_counts_on_the_cpu_only_when_asked(vllm_processor, monkeypatch):
    from flamingo_cli.vllm_plugin import HOST_MASKS_ENV

    def fields(seconds):
        from vllm.multimodal.processing.context import TimingContext
        from vllm.multimodal.processing.inputs import ProcessorInputs

        audio = Case(f"{seconds}", seconds, "", seed=3).samples()
        items = vllm_processor.info.get_data_parser().parse_mm_data({"audio": [audio]})
        out = vllm_processor.apply(ProcessorInputs(prompt="<sound>Describe.", mm_data_items=items), TimingContext())
        (item,) = out["mm_kwargs"]["audio"]
        return {key: elem.field.keep_on_cpu for key, elem in item.items()}

    monkeypatch.delenv(HOST_MASKS_ENV, raising=False)
    assert not any(fields(10.0).values())  # vLLM's default: every field goes to the GPU
    monkeypatch.setenv(HOST_MASKS_ENV, "1")
    for seconds in (10.0, 45.0):  # one window (batched fields), two windows (flat fields with chunk counts)
        on_cpu = fields(seconds)
        assert on_cpu["feature_attention_mask"] and not on_cpu["input_features"], on_cpu
        if "chunk_counts" in on_cpu:
            assert on_cpu["chunk_counts"]


@pytest.mark.engine
def test_host_masks_change_no_token_through_the_real_engine(tiny_af3, monkeypatch):
    """The shared CPU engine with the masks kept on the CPU (vLLM serialises the flag to its engine
    process): the same tokens as without, for a short clip and one of two windows."""
    from conftest import cli_engine

    from flamingo_cli.models import family_for
    from flamingo_cli.parity import make_chunks, run_vllm
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.vllm_plugin import HOST_MASKS_ENV

    engine = cli_engine(tiny_af3)
    builder = PromptBuilder(family_for(str(tiny_af3)), load_chat_template(str(tiny_af3)))
    pairs = make_chunks([Case("a", 4.0, "Describe the audio.", seed=5), Case("b", 47.5, "Say.", seed=6)], 600.0)
    monkeypatch.delenv(HOST_MASKS_ENV, raising=False)
    plain = run_vllm(engine, builder, pairs, 6)
    monkeypatch.setenv(HOST_MASKS_ENV, "1")
    kept = run_vllm(engine, builder, pairs, 6)
    assert len(plain) == 2 and all(len(r.token_ids) == 6 for r in plain.values())
    assert {k: r.token_ids for k, r in plain.items()} == {k: r.token_ids for k, r in kept.items()}
