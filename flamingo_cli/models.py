"""Facts about the Audio Flamingo family, in one place, read from the checkpoint itself.

A checkpoint's files say what it is: ``config.json`` (architecture, model_type), the processor config
(cap ``max_audio_len``, the sound tokens, the Whisper feature extractor's window and hop), the chat
template (system prompt) and ``generation_config.json`` (``max_new_tokens``). Hub ids whose files are
not in the HF cache fall back to a documented built-in default for that id (``ModelFamily.source``
says which; ``doctor`` shows it). Anything else is an error that names what is missing.

Numbers mirror transformers' AudioFlamingo3Processor / MusicFlamingoProcessor: 16 kHz input, Whisper
features with a 160-sample hop, 30 s encoder windows, 750 audio tokens per full window, and a
per-prompt cap (AF3 600 s, MF 1200 s, AF-Next 1800 s) beyond which the processor silently truncates.
Sources and what is inferred: docs/model-family.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
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
# transformers' AF-Next conversion script (PR #44830), the system turn its processor chat template writes.
AFNEXT_SYSTEM_PROMPT = (
    "You are Audio Flamingo-Next, a multimodal assistant for language and audio. "
    "On each turn you receive an optional audio clip which may contain speech, music, or ambient sounds "
    "and optional text, you will receive at least one or both; use your world knowledge and reasoning "
    "to help the user with any task. Interpret the entirety of the content of any input audio\u2014regardless "
    "of whether the user calls it audio, speech, music, or sound."
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

AF3_ARCH = "AudioFlamingo3ForConditionalGeneration"
MF_ARCH = "MusicFlamingoForConditionalGeneration"
# transformers PR #44830 names this class, but no transformers release ships it and the hub AF-Next
# checkpoints declare MF_ARCH; vLLM 0.24 cannot load it either.
AFNEXT_ARCH = "AudioFlamingoNextForConditionalGeneration"
_ARCH_KIND = {AF3_ARCH: "af3", MF_ARCH: "mf"}
_MODEL_TYPE_KIND = {"audioflamingo3": "af3", "musicflamingo": "mf"}
# transformers' processor defaults when processor_config.json has no max_audio_len.
_PROCESSOR_DEFAULT_CAP = {"AudioFlamingo3Processor": 600, "MusicFlamingoProcessor": 1200}


class CheckpointError(ValueError):
    """A checkpoint flamingo cannot use; the message names the file and what is missing."""


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """What flamingo needs to know about one checkpoint (or a hub id's built-in default)."""

    name: str  # af3 | mf | mf-think | afnext | afnext-think | afnext-captioner
    family: str  # af3 | mf | afnext
    architecture: str
    model_type: str
    hub_id: str  # the hub id, or the local folder it was read from
    max_audio_s: int
    system_prompt: str
    sound_bos: str | None
    sound_eos: str | None
    sound_token: str = "<sound>"
    window_s: int = WINDOW_S
    tokens_per_window: int = TOKENS_PER_WINDOW
    think: bool = False  # emits <think> … </think> before the answer
    max_new_tokens: int | None = None  # generation_config.json's default output budget
    source: str = "built-in default"  # or "checkpoint <folder>"

    @property
    def max_windows(self) -> int:
        return self.max_audio_s // self.window_s


_AF3_FACTS = dict(
    architecture=AF3_ARCH,
    model_type="audioflamingo3",
    max_audio_s=600,
    system_prompt=AF3_SYSTEM_PROMPT,
    sound_bos=None,
    sound_eos=None,
)
_MF_FACTS = dict(
    architecture=MF_ARCH,
    model_type="musicflamingo",
    max_audio_s=1200,
    system_prompt=MF_SYSTEM_PROMPT,
    sound_bos="<|sound_bos|>",
    sound_eos="<|sound_eos|>",
    max_new_tokens=2048,
)
# AF-Next checkpoints are Music Flamingo's architecture with a longer cap and their own system prompt.
_FACTS = {
    "af3": _AF3_FACTS,
    "mf": _MF_FACTS,
    "afnext": {**_MF_FACTS, "max_audio_s": 1800, "system_prompt": AFNEXT_SYSTEM_PROMPT},
}


def _default(name: str, family: str, hub_id: str, **kw) -> ModelFamily:
    return ModelFamily(name=name, family=family, hub_id=hub_id, **{**_FACTS[family], **kw})


# Built-in defaults per hub id: used only when the checkpoint is neither a local folder nor in the HF cache
# (dry runs and doctor on a machine without the weights). docs/model-family.md gives each fact's source.
AF3 = _default("af3", "af3", "nvidia/audio-flamingo-3-hf")
MF = _default("mf", "mf", "nvidia/music-flamingo-2601-hf")
MF_THINK = _default("mf-think", "mf", "nvidia/music-flamingo-think-2601-hf", think=True)
AFNEXT = _default("afnext", "afnext", "nvidia/audio-flamingo-next-hf")
AFNEXT_THINK = _default("afnext-think", "afnext", "nvidia/audio-flamingo-next-think-hf", think=True)
AFNEXT_CAPTIONER = _default("afnext-captioner", "afnext", "nvidia/audio-flamingo-next-captioner-hf")
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (AF3, MF, MF_THINK, AFNEXT, AFNEXT_THINK, AFNEXT_CAPTIONER)}
_BY_HUB_ID = {f.hub_id: f for f in FAMILIES.values()}


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


def _tokens_per_window(frames: int) -> int:
    conv = (frames - 1) // 2 + 1
    return (conv - 2) // 2 + 1


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _chat_template(folder: Path, processor: dict) -> str | None:
    """The processor chat template, wherever transformers 4 or 5 saved it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        tpl = _read_json(as_json).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    tokenizer_config = folder / "tokenizer_config.json"
    for source in (processor, _read_json(tokenizer_config) if tokenizer_config.is_file() else {}):
        tpl = source.get("chat_template")
        if isinstance(tpl, str):
            return tpl
    return None


_SYSTEM_RE = re.compile(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>|<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def system_prompt_of(template: str) -> str | None:
    """The default system turn a processor chat template writes (None if it writes none)."""
    m = _SYSTEM_RE.search(template)
    if not m:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def _variant_hints(folder: Path) -> str:
    """Names that say think/captioner: the hub id in an HF cache path, the folder, flamingo's marker."""
    hints = [folder.name.lower()] + [p.lower() for p in folder.parts if p.startswith("models--")]
    marker = folder / "flamingo_checkpoint.json"
    if marker.is_file():
        hints.append(str(_read_json(marker).get("kind", "")).lower())
    return " ".join(hints)


def read_checkpoint(folder: str | Path) -> ModelFamily:
    """Read a checkpoint folder's own files into a ModelFamily; CheckpointError names what is missing."""
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a model checkpoint folder)")
    config = _read_json(config_path)
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    if AFNEXT_ARCH in archs or model_type == "audioflamingonext":
        raise CheckpointError(
            f"{config_path}: declares {AFNEXT_ARCH} / audioflamingonext, which neither transformers 5.17 nor "
            f"vLLM 0.24 ship; the hub AF-Next checkpoints declare {MF_ARCH} / musicflamingo"
        )
    kind = next((_ARCH_KIND[a] for a in archs if a in _ARCH_KIND), None) or _MODEL_TYPE_KIND.get(model_type)
    if kind is None:
        raise CheckpointError(
            f"{config_path}: architectures {archs or 'missing'} / model_type {model_type!r} is not an Audio Flamingo "
            f"checkpoint flamingo knows ({AF3_ARCH} or {MF_ARCH})"
        )
    architecture = next((a for a in archs if a in _ARCH_KIND), AF3_ARCH if kind == "af3" else MF_ARCH)

    processor_path = folder / "processor_config.json"
    processor = _read_json(processor_path) if processor_path.is_file() else {}
    features = processor.get("feature_extractor")
    if not isinstance(features, dict):
        pre = folder / "preprocessor_config.json"
        if not pre.is_file():
            raise CheckpointError(
                f"{folder}: neither processor_config.json with a feature_extractor nor preprocessor_config.json "
                "(the Whisper feature extractor's window and hop are unknown)"
            )
        features = _read_json(pre)
    window_s = features.get("chunk_length", WINDOW_S)
    hop = features.get("hop_length", HOP_LENGTH)
    rate = features.get("sampling_rate", SAMPLE_RATE)
    if (window_s, hop, rate) != (WINDOW_S, HOP_LENGTH, SAMPLE_RATE):
        raise CheckpointError(
            f"{folder}: feature extractor declares chunk_length={window_s}, hop_length={hop}, sampling_rate={rate}; "
            f"the Audio Flamingo encoder (and flamingo) work with {WINDOW_S} s windows, hop {HOP_LENGTH}, "
            f"{SAMPLE_RATE} Hz"
        )
    processor_class = processor.get("processor_class") or (
        "AudioFlamingo3Processor" if kind == "af3" else "MusicFlamingoProcessor"
    )
    cap = processor.get("max_audio_len", _PROCESSOR_DEFAULT_CAP.get(processor_class))
    if not isinstance(cap, int | float) or cap < WINDOW_S:
        raise CheckpointError(f"{processor_path}: no usable max_audio_len ({cap!r}) for {processor_class}")
    sound_token = processor.get("audio_token", "<sound>")
    if kind == "af3":
        sound_bos = sound_eos = None
    else:
        sound_bos = processor.get("audio_bos_token", "<|sound_bos|>")
        sound_eos = processor.get("audio_eos_token", "<|sound_eos|>")

    template = _chat_template(folder, processor)
    if template is None:
        raise CheckpointError(
            f"{folder}: no chat template (chat_template.jinja, chat_template.json, or chat_template in "
            "processor_config.json / tokenizer_config.json): the prompt format is unknown"
        )
    system_prompt = system_prompt_of(template) or ""

    generation_path = folder / "generation_config.json"
    max_new_tokens = _read_json(generation_path).get("max_new_tokens") if generation_path.is_file() else None

    # MF and AF-Next share one architecture; AF-Next is the one with the 30-minute cap (its own system
    # prompt says so too).
    family = kind
    if kind == "mf" and (cap >= 1800 or system_prompt.startswith("You are Audio Flamingo-Next")):
        family = "afnext"
    hints = _variant_hints(folder)
    think = "think" in hints
    name = family + ("-think" if think else "-captioner" if family == "afnext" and "captioner" in hints else "")
    if name not in FAMILIES:  # af3-think / af3-captioner: no such checkpoints; keep the family's name
        name = family
    return ModelFamily(
        name=name,
        family=family,
        architecture=architecture,
        model_type=str(model_type or ("audioflamingo3" if kind == "af3" else "musicflamingo")),
        hub_id=str(folder),
        max_audio_s=int(cap),
        system_prompt=system_prompt,
        sound_bos=sound_bos,
        sound_eos=sound_eos,
        sound_token=sound_token,
        window_s=int(window_s),
        tokens_per_window=_tokens_per_window(int(window_s * rate // hop)),
        think=think,
        max_new_tokens=int(max_new_tokens) if isinstance(max_new_tokens, int) else None,
        source=f"checkpoint {folder}",
    )


def cached_snapshot(hub_id: str) -> Path | None:
    """The HF-cache snapshot folder holding hub_id's config.json, if it is cached."""
    import os

    # The environment as it is now (huggingface_hub reads it once, at import).
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir)
    except Exception:
        return None
    return Path(hit).parent if isinstance(hit, str) and Path(hit).is_file() else None


def family_for(model: str) -> ModelFamily:
    """Resolve an alias (af3, mf, afnext-think, …), hub id or local checkpoint folder to its facts.

    A local folder or a cached hub snapshot is read; an uncached known hub id gets its built-in default
    (``source`` says so); anything else raises CheckpointError naming what is missing.
    """
    hub_id = resolve_model_id(model)
    local = Path(hub_id).expanduser()
    if local.is_dir():
        return read_checkpoint(local)
    if "/" in hub_id and not hub_id.startswith((".", "/", "~")):
        snapshot = cached_snapshot(hub_id)
        if snapshot is not None:
            fam = read_checkpoint(snapshot)
            known = _BY_HUB_ID.get(hub_id)
            # The hub id names the variant more reliably than a snapshot hash folder.
            name = known.name if known is not None and known.family == fam.family else fam.name
            return replace(fam, name=name, think=FAMILIES[name].think or fam.think, hub_id=hub_id)
        if hub_id in _BY_HUB_ID:
            return _BY_HUB_ID[hub_id]
        raise CheckpointError(
            f"{hub_id}: not a local folder, not in the HF cache, and not a hub id flamingo has built-in facts for "
            f"({', '.join(sorted(_BY_HUB_ID))}); download it first (hf download {hub_id}) or pass a local folder"
        )
    raise CheckpointError(
        f"cannot tell the model of {model!r}: no such folder; "
        f"use {', '.join(FAMILIES)}, a hub id or a checkpoint folder"
    )


def resolve_model_id(model: str) -> str:
    """Aliases map to hub ids; anything else (hub id or local path) passes through."""
    return FAMILIES[model].hub_id if model in FAMILIES else model
