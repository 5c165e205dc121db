"""flamingo's model code for vLLM, loaded in every vLLM process through the ``vllm.general_plugins``
entry point (pyproject.toml). vLLM calls ``register()`` before it resolves a checkpoint's architecture.

Kept small: only what vLLM 0.24's in-tree Audio Flamingo classes lack or must do differently.
Nothing here imports torch or vLLM at module level: ``register()`` names classes by string, so vLLM
imports them only in the process that builds the model.
"""

from __future__ import annotations

import os
from typing import Any

# ---------------------------------------------------------------------------------------------------
# Encoder trimming (issue 14): AF3 / MF audio tower on each window's valid mel frames only.
#
# Every 30-s Whisper window reaches the model as 3000 mel frames; a shorter window is padded and its
# padded frames are masked as attention keys. So the valid outputs depend only on the valid frames and
# the few padded frames the two convolutions (kernel 3, the second with stride 2) read: conv2 output j
# reads conv1 outputs 2j-1..2j+1, which read mel frames 2j-2..2j+2. Running each window on those frames
# alone, windows of similar length batched together, gives the same valid outputs up to floating-point
# order at a fraction of the cost (a 10-s clip: ~1/3). Off with FLAMINGO_TRIM_ENCODER=0, or per engine
# through the config override TRIM_OVERRIDE (flamingo's --no-trim-encoder).
# ---------------------------------------------------------------------------------------------------

TRIM_ENV = "FLAMINGO_TRIM_ENCODER"
# With trimming on, vLLM's front-end also sends each request's log-mel compact: only the frames the
# trimmed encoder reads (vLLM has already cast them to the model's dtype). The engine core batches every
# new request's features into pinned memory each step (``_batch_mm_items`` -> ``_reduce_data``: 17-22 %
# of its main thread on 10-s clips on the H200, fourth lease); a 10-s clip's bf16 window shrinks from
# 768 KB to 256 KB. Measured (fifth lease): no faster, and that share unchanged: the cost is per step,
# not per byte. Kept because it is exact and moves a third of the bytes. Off: FLAMINGO_COMPACT_FEATURES=0.
COMPACT_ENV = "FLAMINGO_COMPACT_FEATURES"
TRIM_OVERRIDE = "flamingo_trim_encoder"  # hf_overrides key: False keeps vLLM's untrimmed encoder
# The audio masks (each window's valid frames) and chunk counts stay on the CPU in the engine core
# (vLLM's ``keep_on_cpu`` field flag), so the model reads the lengths it plans with for free. Moved to
# the GPU, as vLLM does by default, each read waits for everything queued on the GPU: in a 2026-12-07
# H100 profile of 10-s clips vLLM's ``chunk_counts.tolist()`` and ``_flatten_valid_audio_embeddings``
# (a boolean-mask index) held the engine core's thread for 5-8 % each, on every step that admits new
# audio, and the engine core is the limit there. Opt-in (FLAMINGO_HOST_MASKS=1) until a GPU lease
# measures it; the encoder and the embedding split below read lengths once either way.
HOST_MASKS_ENV = "FLAMINGO_HOST_MASKS"
# A group's fixed cost in encoder positions (kernel launches of 32 layers): windows are batched with
# the next longer ones unless the padding that adds costs more than running a separate group.
GROUP_OVERHEAD_POSITIONS = 256

ARCHITECTURES = {
    "AudioFlamingo3ForConditionalGeneration": "flamingo_cli.vllm_plugin:TrimmedAudioFlamingo3",
    "MusicFlamingoForConditionalGeneration": "flamingo_cli.vllm_plugin:TrimmedMusicFlamingo",
}


def _switched_off(env: str) -> bool:
    """An on-by-default switch set to 0/false/no/off in the environment."""
    return os.environ.get(env, "1").strip().lower() in ("0", "false", "no", "off")


def trim_enabled(hf_config: Any = None) -> bool:
    """Trimming is on unless the env or the engine's config override turns it off."""
    if _switched_off(TRIM_ENV):
        return False
    return bool(getattr(hf_config, TRIM_OVERRIDE, True))


def host_masks_enabled() -> bool:
    """The audio masks stay on the CPU (an opt-in switch, see HOST_MASKS_ENV)."""
    return os.environ.get(HOST_MASKS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _on_host(config: Any) -> Any:
    """A ``MultiModalFieldConfig`` whose data vLLM leaves on the CPU when it batches a step's inputs."""
    from dataclasses import replace

    return replace(config, field=replace(config.field, keep_on_cpu=True))


def host_ints(values: Any) -> list[int]:
    """A tensor's (or sequence's) integers on the host: free for a CPU tensor, one wait for a GPU one."""
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def device_ints(values: list[int], device: Any) -> Any:
    """``values`` as a long tensor on ``device``, copied without waiting for the GPU's queue."""
    import torch

    out = torch.tensor(values, dtype=torch.long)
    if getattr(device, "type", str(device)) == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def post_pool_lengths(mel_lengths: list[int]) -> list[int]:
    """Sound tokens per window for its valid mel frames, as vLLM counts them (conv2, then the pool)."""
    return [max(0, (conv_lengths(m) - 2) // 2 + 1) for m in mel_lengths]


def compact_enabled(hf_config: Any = None) -> bool:
    """Compact features go with trimming (the untrimmed encoder reads every frame); env opt-out."""
    return not _switched_off(COMPACT_ENV) and trim_enabled(hf_config)


def conv_lengths(mel_lengths):
    """Positions after conv2 (stride 2) for ``mel_lengths`` valid mel frames."""
    return (mel_lengths - 1) // 2 + 1


def frames_read(positions: int, frames: int) -> int:
    """Mel frames (from the window's start) that ``encode_trimmed`` reads for ``positions`` conv2
    outputs: output positions-1 reads mel frames up to 2 x positions; the frame after is never read."""
    return min(frames, 2 * positions + 1)


def compact_features(outputs: Any) -> Any:
    """The processor's ``outputs`` with ``input_features`` cut to the frames the trimmed encoder reads
    for the longest window among them, ``feature_attention_mask`` alike (its sums, which give the
    sound-token counts, are unchanged). Only frames never read are dropped: what the encoder reads is
    bit-for-bit what the processor computed. ``pad_frames`` restores the window's shape."""
    features, mask = outputs.get("input_features"), outputs.get("feature_attention_mask")
    if features is None or mask is None or not hasattr(features, "shape") or features.shape[0] == 0:
        return outputs
    keep = frames_read(conv_lengths(int(mask.sum(-1).max())), features.shape[-1])
    outputs["input_features"] = features[..., :keep].contiguous()
    outputs["feature_attention_mask"] = mask[..., :keep].contiguous()
    return outputs


def pad_frames(x: Any, frames: int) -> Any:
    """Zero-pad compact features or masks (a tensor, or vLLM's list of them) back to ``frames``.

    vLLM batches requests of different compact lengths by zero-padding them to the step's longest; the
    trimmed encoder never reads a window's frames past ``frames_read``, so zeros there change nothing.
    """
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [pad_frames(t, frames) for t in x]
    if x.shape[-1] >= frames:
        return x
    from torch.nn import functional as F

    return F.pad(x, (0, frames - x.shape[-1]))


def plan_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD_POSITIONS) -> list[list[int]]:
    """Split window indices into groups run together, each padded to its longest window.

    Minimises sum(group size x longest length) + overhead x groups over contiguous runs of the
    windows sorted by length (optimal for this cost; O(n^2) for the few hundred windows of a batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[k]: cost of the k shortest windows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * longest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def encode_trimmed(tower, features, mel_lengths, overhead: int = GROUP_OVERHEAD_POSITIONS):
    """vLLM's AF3 encoder output (N, positions/2, d) with every window run on its valid frames only.

    ``tower`` is vLLM's ``AudioFlamingo3Encoder`` (Whisper convs + HF encoder layers + pool + norm),
    ``features`` (N, mel, frames) the padded log-mel, ``mel_lengths`` (N,) its valid frame counts (a
    tensor on any device, or ints). The lengths are read on the host once; nothing after that waits for
    the GPU. Positions past a window's valid outputs are left zero: callers keep only the valid ones.
    """
    import torch
    from torch.nn import functional as F

    n, _, frames = features.shape
    full = conv_lengths(frames)
    valid = [min(max(conv_lengths(m), 0), full) for m in host_ints(mel_lengths)]
    out = features.new_zeros(n, full // 2, tower.layer_norm.normalized_shape[0])
    for group in plan_groups(valid, overhead):
        group_valid = [valid[i] for i in group]
        longest = max(group_valid)
        if longest < 2:  # no pooled output: a window's last 10 ms give no sound token (vLLM counts 0)
            continue
        idx = device_ints(group, features.device)
        lens = device_ints(group_valid, features.device)
        x = features[idx, :, : frames_read(longest, frames)]
        x = F.gelu(tower.conv1(x))
        x = F.gelu(tower.conv2(x))[:, :, :longest].transpose(1, 2)
        x = (x + tower.embed_positions.weight[:longest]).to(x.dtype)
        mask = None  # windows of one length need none (and sdpa may then take its flash kernel)
        if min(group_valid) < longest:
            pad = torch.arange(longest, device=x.device)[None, :] >= lens[:, None]
            mask = torch.zeros(len(group), 1, 1, longest, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(pad[:, None, None, :], float("-inf")).expand(-1, 1, longest, longest)
        for layer in tower.layers:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
        x = tower.layer_norm(tower.avg_pooler(x.transpose(1, 2)).transpose(1, 2))
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < (lens // 2)[:, None]  # valid outputs
        out[idx, : x.shape[1]] = (x * keep[:, :, None]).to(out.dtype)
    return out


def group_embeddings(audio_features, mel_lengths, chunk_counts) -> tuple:
    """vLLM's ``_group_audio_embeddings``: each audio's valid embeddings, its windows concatenated —
    from lengths read on the host once, by slicing (vLLM's boolean-mask index waits for the GPU)."""
    import torch

    lengths = [min(n, audio_features.shape[1]) for n in post_pool_lengths(host_ints(mel_lengths))]
    windows = [audio_features[i, :n] for i, n in enumerate(lengths)]
    grouped, at = [], 0
    for count in host_ints(chunk_counts):
        grouped.append(torch.cat(windows[at : at + count], dim=0))
        at += count
    return tuple(grouped)


def _compacting_processor(base: type) -> type:
    """``base`` (vLLM's AF3 or MF multimodal processor) that sends compact features when enabled."""

    class Compacting(base):
        def _call_hf_processor(self, prompt, mm_data, mm_kwargs, tok_kwargs):
            outputs = super()._call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)
            if not compact_enabled(self.info.ctx.model_config.hf_config):
                return outputs
            return compact_features(outputs)

        def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
            fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
            if host_masks_enabled():
                for key in ("feature_attention_mask", "chunk_counts"):
                    if key in fields:
                        fields[key] = _on_host(fields[key])
            return fields

    Compacting.__name__ = Compacting.__qualname__ = f"Compacting{base.__name__}"
    Compacting.__doc__ = f"vLLM's {base.__name__} sending only the frames the trimmed encoder reads."
    return Compacting


def _trimming_class(base: type) -> type:
    """``base`` (vLLM's AF3 or MF class) with its audio tower run trimmed when enabled, and its
    multimodal processor sending compact features."""

    class Trimmed(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.flamingo_trim = trim_enabled(vllm_config.model_config.hf_config)
            from vllm.logger import init_logger

            state = "trimmed to each window's valid frames" if self.flamingo_trim else "untrimmed (opted out)"
            init_logger(__name__).info("flamingo: %s audio tower runs %s", base.__name__, state)

        def _parse_and_validate_audio_input(self, **kwargs):
            # compact features (any trimmed engine may get them) back to vLLM's window shape
            frames = 2 * self.config.audio_config.max_source_positions
            for key in ("input_features", "feature_attention_mask"):
                if kwargs.get(key) is not None:
                    kwargs[key] = pad_frames(kwargs[key], frames)
            return super()._parse_and_validate_audio_input(**kwargs)

        def _encode_audio_features(self, input_features, feature_attention_mask):
            weight = self.audio_tower.conv1.weight
            if not self.flamingo_trim:  # vLLM's encoder builds its attention mask on the mask's device
                return super()._encode_audio_features(input_features, feature_attention_mask.to(weight.device))
            features = input_features.to(dtype=weight.dtype, device=weight.device)
            return encode_trimmed(self.audio_tower, features, feature_attention_mask.sum(-1))

        def _group_audio_embeddings(self, audio_features, feature_attention_mask, chunk_counts):
            return group_embeddings(audio_features, feature_attention_mask.sum(-1), chunk_counts)

    Trimmed.__doc__ = f"vLLM's {base.__name__} whose audio tower runs on valid frames (flamingo)."
    from vllm.multimodal import MULTIMODAL_REGISTRY

    factories = base._processor_factory
    return MULTIMODAL_REGISTRY.register_processor(
        _compacting_processor(factories.processor), info=factories.info, dummy_inputs=factories.dummy_inputs
    )(Trimmed)


def __getattr__(name: str):
    """The model classes, built on first use in the process that loads the model (imports vLLM)."""
    if name == "TrimmedAudioFlamingo3":
        from vllm.model_executor.models.audioflamingo3 import AudioFlamingo3ForConditionalGeneration as base
    elif name == "TrimmedMusicFlamingo":
        from vllm.model_executor.models.musicflamingo import MusicFlamingoForConditionalGeneration as base
    else:
        raise AttributeError(name)
    cls = _trimming_class(base)
    cls.__module__, cls.__name__, cls.__qualname__ = __name__, name, name  # picklable by name
    globals()[name] = cls
    return cls


def register() -> None:
    """Register flamingo's model classes with vLLM's ModelRegistry (idempotent; cheap when unused)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
