"""Facts about the two model families, in one place.

The numbers mirror transformers' AudioFlamingo3Processor / MusicFlamingoProcessor: 16 kHz input,
Whisper features with a 160-sample hop, 30 s encoder windows, 750 audio tokens per full window and a
per-prompt cap (600 s AF3, 1200 s MF) beyond which the processor silently truncates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flamingo_cli.records import SAMPLE_RATE

HOP_LENGTH = 160
WINDOW_S = 30
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE
TOKENS_PER_WINDOW = 750

AF3_SYSTEM_PROMPT = "You are a helpful assistant."
MF_SYSTEM_PROMPT = (
    "You are Music Flamingo, a multimodal assistant for language and music. "
    "On each turn you receive an audio clip which contains music and optional text, "
    "you will receive at least one or both; use your world knowledge and reasoning "
    "to help the user with any task. Interpret the entirety of the content any input music"
    "--regardlenss of whether the user calls it audio, music, or sound."
)


@dataclass(frozen=True, slots=True)
class ModelFamily:
    name: str  # "af3" | "mf"
    architecture: str
    hub_id: str
    max_audio_s: int
    system_prompt: str
    sound_bos: str | None
    sound_eos: str | None
    sound_token: str = "<sound>"


AF3 = ModelFamily(
    name="af3",
    architecture="AudioFlamingo3ForConditionalGeneration",
    hub_id="nvidia/audio-flamingo-3-hf",
    max_audio_s=600,
    system_prompt=AF3_SYSTEM_PROMPT,
    sound_bos=None,
    sound_eos=None,
)
MF = ModelFamily(
    name="mf",
    architecture="MusicFlamingoForConditionalGeneration",
    hub_id="nvidia/music-flamingo-2601-hf",
    max_audio_s=1200,
    system_prompt=MF_SYSTEM_PROMPT,
    sound_bos="<|sound_bos|>",
    sound_eos="<|sound_eos|>",
)
FAMILIES = {f.name: f for f in (AF3, MF)}
_BY_ARCH = {f.architecture: f for f in (AF3, MF)}
_BY_MODEL_TYPE = {"audioflamingo3": AF3, "musicflamingo": MF}


def num_mel_frames(n_samples: int) -> int:
    """Valid mel frames the Whisper feature extractor marks for n_samples (its attention mask)."""
    return -(-n_samples // HOP_LENGTH) if n_samples > 0 else 0


def num_audio_tokens(n_samples: int) -> int:
    """Sound tokens the processor expands one <sound> into, for audio within the cap.

    The processor splits audio into 30 s windows, sums the valid mel frames of all windows and applies
    the encoder's conv (stride 2) and pooling (stride 2) length formulas to the total.
    """
    frames = 0
    remaining = n_samples
    while remaining > 0:
        take = min(remaining, WINDOW_SAMPLES)
        frames += num_mel_frames(take)
        remaining -= take
    if frames == 0:
        return 0
    conv = (frames - 1) // 2 + 1
    return max(0, (conv - 2) // 2 + 1)


def num_windows(n_samples: int) -> int:
    return max(1, -(-n_samples // WINDOW_SAMPLES))


def family_for(model: str) -> ModelFamily:
    """Resolve a preset name, hub id or local checkpoint path to its model family."""
    if model in FAMILIES:
        return FAMILIES[model]
    for fam in FAMILIES.values():
        if model == fam.hub_id:
            return fam
    config = Path(model) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for arch in data.get("architectures") or []:
            if arch in _BY_ARCH:
                return _BY_ARCH[arch]
        if data.get("model_type") in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[data["model_type"]]
        raise ValueError(f"{model}: config.json names no Audio Flamingo 3 / Music Flamingo architecture")
    lowered = model.lower()
    if "music-flamingo" in lowered or "musicflamingo" in lowered:
        return MF
    if "audio-flamingo" in lowered or "audioflamingo" in lowered:
        return AF3
    raise ValueError(f"cannot tell the model family of {model!r}: use af3, mf, a hub id, or a local checkpoint folder")


def resolve_model_id(model: str) -> str:
    """Preset names map to hub ids; anything else (hub id or local path) passes through."""
    return FAMILIES[model].hub_id if model in FAMILIES else model
