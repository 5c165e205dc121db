"""Write real compressed audio files with PyAV's encoders (FFmpeg bundled in the ``av`` wheel).

The formats libsndfile cannot read (mp2, m4a/aac, wma, amr, webm, opus-in-mp4, ...), generated in
the test itself so no fixture file is committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# extension -> (container format, codec, sample rate, channels)
ENCODINGS: dict[str, tuple[str, str, int, int]] = {
    ".mp2": ("mp2", "mp2", 44100, 2),
    ".m4a": ("ipod", "aac", 44100, 2),
    ".aac": ("adts", "aac", 22050, 1),
    ".wma": ("asf", "wmav2", 44100, 2),
    ".webm": ("webm", "libopus", 48000, 2),
    ".amr": ("amr", "libopencore_amrnb", 8000, 1),
    ".mp4": ("mp4", "libopus", 48000, 1),  # opus in mp4
    ".oga": ("ogg", "libopus", 48000, 2),  # Ogg Opus under the .oga name
    ".mka": ("matroska", "flac", 32000, 2),
    ".ac3": ("ac3", "ac3", 48000, 2),
}


def tone(sr: int, seconds: float, channels: int, freq: float = 1000.0) -> np.ndarray:
    """(channels, samples) float32 sine, the layout PyAV's planar float frames take."""
    t = np.arange(round(sr * seconds)) / sr
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(mono[None, :], channels, axis=0)


def encode(path: Path, seconds: float = 2.0, freq: float = 1000.0) -> Path:
    """Write ``seconds`` of a ``freq`` Hz tone to ``path`` in the encoding its extension names."""
    import av

    fmt, codec, sr, channels = ENCODINGS[path.suffix.lower()]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr)
        stream.layout = "stereo" if channels == 2 else "mono"
        if codec == "wmav2":
            stream.bit_rate = 96000  # its default (0) cannot open
        ctx = stream.codec_context
        sample_format = ctx.codec.audio_formats[0].name
        data = tone(sr, seconds, channels, freq)
        resampler = av.AudioResampler(format=sample_format, layout=stream.layout, rate=sr)
        step = ctx.frame_size or 1024
        pts = 0
        for i in range(0, data.shape[1], step):
            block = np.ascontiguousarray(data[:, i : i + step])
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=stream.layout)
            frame.sample_rate = sr
            frame.pts = pts
            pts += frame.samples
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for f in resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
