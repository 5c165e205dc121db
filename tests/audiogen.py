"""Real compressed audio files for tests, written with PyAV's encoders (audio.write_ffmpeg).

The formats libsndfile cannot read (m4a/aac, wma, amr, webm, opus-in-mp4, ...), generated in the
test itself so no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flamingo_cli.audio import FFMPEG_ENCODINGS as ENCODINGS
from flamingo_cli.audio import write_ffmpeg

__all__ = ["ENCODINGS", "encode", "tone"]


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
