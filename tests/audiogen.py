"""Real compressed audio files for tests, written with PyAV's encoders (audio.write_ffmpeg).

The formats libsndfile cannot read (m4a/aac, wma, amr, webm, opus-in-mp4, ...), generated in the
test itself so no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flamingo_cli.audio import FFMPEG_ENCODINGS as ENCODINGS
from flamingo_cli.audio import write_ffmpeg

__all__ = ["ENCODINGS", "encode", "speech_like", "tone"]


def tone(sr: int, seconds: float, channels: int, freq: float = 1000.0) -> np.ndarray:
    """(channels, samples) float32 sine, the layout PyAV's planar float frames take."""
    t = np.arange(round(sr * seconds)) / sr
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[None, :], channels, axis=0)


def encode(path: Path, seconds: float = 2.0, freq: float = 1000.0) -> Path:
    """Write ``seconds`` of a ``freq`` Hz tone to ``path`` in the encoding its extension names."""
    _, _, sr, channels = ENCODINGS[path.suffix.lower()]
    write_ffmpeg(path, tone(sr, seconds, channels, freq))
    return path


def speech_like(seconds: float, sr: int = 16000) -> np.ndarray:
    """A voiced, vowel-like signal (a gliding 120 Hz pulse train through three formant resonators,
    amplitude-modulated at a syllable rate of 4 Hz), peak 0.5: what a VAD may take for speech. A pure
    tone is not (Silero VAD calls it non-speech)."""
    from scipy.signal import lfilter

    t = np.arange(round(seconds * sr)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    source = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    y = np.zeros_like(source)
    for fc, bw in ((700, 130), (1220, 70), (2600, 160)):  # the formants of an /a/
        r, theta = np.exp(-np.pi * bw / sr), 2 * np.pi * fc / sr
        y += lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], source)
    return (0.5 * y / np.abs(y).max()).astype(np.float32)
