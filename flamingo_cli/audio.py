"""Decode any audio file (or a segment of one) to 16 kHz mono float32.

soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...) reads first, seeking to the
segment and reading it in blocks, each block resampled with a streaming soxr resampler (the same HQ
filter as librosa's default "soxr_hq"), so memory stays at the 16 kHz mono result plus one block even
for a 3-hour 48 kHz stereo file. Files libsndfile cannot open (m4a/aac, wma, mp2, amr, webm, ...) go
through PyAV (the ``av`` wheel bundles FFmpeg: no system ffmpeg needed): its frames are converted to
float32 and fed to the same downmix + soxr block pipeline. Sizes from headers are never trusted beyond
MAX_PREALLOC_SAMPLES.

An item's audio can also come from a URL (``s3://…``, read through fsspec with ranged reads: a segment
seeks, it does not download the whole object) or from bytes the source already holds (``item.data``:
a dataset row, a WebDataset member); libsndfile and PyAV both read them as file objects.

Every failure is an AudioDecodeError that names the file and the reason, so the CLI can record it per
item and keep going. Nothing here holds global state: decode() is safe to call from many threads.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import soundfile as sf
import soxr

from flamingo_cli.records import SAMPLE_RATE, AudioItem, DecodedAudio
from flamingo_cli.remote import is_url, open_binary, redact

# Source seconds per block: bounds the memory of one read (48 kHz stereo float32: ~11 MB).
BLOCK_SECONDS = 30
RESAMPLE_QUALITY = "HQ"  # == librosa res_type="soxr_hq"
# The most a header may make us allocate up front (10 min at 16 kHz, 38 MB); longer audio grows the
# buffer by doubling as it decodes.
MAX_PREALLOC_SAMPLES = 10 * 60 * SAMPLE_RATE
# Ranged-read size for remote objects: a segment costs its own bytes plus about one block (the header's).
REMOTE_BLOCK_BYTES = 2 << 20


class AudioDecodeError(Exception):
    """An item's audio cannot be decoded; str() is "<path>: <reason>"."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _Resampled:
    """Collects mono source blocks as 16 kHz samples in one growing buffer (no list + concatenate)."""

    def __init__(self, path: str, sample_rate: int, expected_in_frames: int | None) -> None:
        self.path = path
        self.sample_rate = sample_rate
        self.frames_in = 0
        self._stream = (
            None
            if sample_rate == SAMPLE_RATE
            else soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        )
        expected = 0
        if expected_in_frames is not None and expected_in_frames > 0:
            expected = round(expected_in_frames * SAMPLE_RATE / sample_rate) + 16
        # A header's length is a hint, not a promise (a FLAC STREAMINFO can claim 2^36 samples for 2 s
        # of audio): preallocate at most MAX_PREALLOC_SAMPLES and grow as blocks really arrive.
        self._buf = np.empty(min(max(expected, 1024), MAX_PREALLOC_SAMPLES), dtype=np.float32)
        self._n = 0

    def push(self, block: np.ndarray) -> None:
        """block: (frames, channels) float32 at the source rate."""
        if block.shape[0] == 0:
            return
        if not np.isfinite(block).all():
            raise AudioDecodeError(self.path, "audio contains NaN or infinite samples")
        mono = block[:, 0] if block.shape[1] == 1 else _downmix(block)
        self.frames_in += mono.shape[0]
        if self._stream is None:
            self._append(mono)
        else:
            self._append(self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32)))

    def finish(self) -> np.ndarray:
        if self._stream is not None:
            self._append(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        out = self._buf[: self._n]
        # Drop the slack of an over-estimated buffer rather than keep it alive behind a view.
        if self._buf.shape[0] - self._n > 1 << 16:
            out = out.copy()
        return np.ascontiguousarray(out, dtype=np.float32)

    def _append(self, y: np.ndarray) -> None:
        need = self._n + y.shape[0]
        if need > self._buf.shape[0]:
            grown = np.empty(max(need, self._buf.shape[0] * 2), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = y
        self._n = need


def _downmix(block: np.ndarray) -> np.ndarray:
    """Mean over channels, column by column: block.mean(axis=1) on a (frames, 2) array is ~30x slower
    (numpy reduces each 2-element row separately) and took ~40 % of a stereo file's decode time.
    Bit-identical to block.mean(axis=1, dtype=np.float32) for 2 to 7 channels (checked)."""
    mono = block[:, 0] + block[:, 1]
    for c in range(2, block.shape[1]):
        mono += block[:, c]
    mono /= np.float32(block.shape[1])  # the division np.mean does (not a multiply by 1/n)
    return mono


def _fmt_s(seconds: float) -> str:
    return str(round(float(seconds), 3))


def _check_file(path: str, known: Any = None) -> None:
    """The cheap, clear failures, before any decoder produces a cryptic message. ``known``: the item's
    fingerprint (``AudioItem.source``: a regular file of that size), so the file is not stat'ed again."""
    if known is not None:
        mode, size = stat.S_IFREG, known.size
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise AudioDecodeError(path, "file not found") from None
        except PermissionError:
            raise AudioDecodeError(path, "permission denied") from None
        except OSError as e:
            raise AudioDecodeError(path, f"cannot access file ({e.strerror or e})") from None
        mode, size = st.st_mode, st.st_size
    if stat.S_ISDIR(mode):
        raise AudioDecodeError(path, "is a directory, not an audio file")
    if stat.S_ISREG(mode) and size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise AudioDecodeError(path, "permission denied") from None
    except OSError as e:
        raise AudioDecodeError(path, f"cannot open file ({e.strerror or e})") from None


def _segment(item: AudioItem, path: str) -> tuple[float, float | None]:
    offset = float(item.offset or 0.0)
    duration = None if item.duration is None else float(item.duration)
    if not math.isfinite(offset) or offset < 0:
        raise AudioDecodeError(path, f"invalid offset {offset} s (must be >= 0)")
    if duration is not None and (not math.isfinite(duration) or duration <= 0):
        raise AudioDecodeError(path, f"invalid duration {duration} s (must be > 0)")
    return offset, duration


def shown_path(item: AudioItem) -> str:
    """The item's path as messages may show it (a URL without credentials)."""
    return redact(item.path) if is_url(item.path) else item.path


def _open_url(url: str, shown: str) -> IO[bytes]:
    """The object as a seekable file (ranged reads), with the cheap clear failures first."""
    try:
        f = open_binary(url, block_size=REMOTE_BLOCK_BYTES)
    except FileNotFoundError:
        raise AudioDecodeError(shown, "file not found") from None
    except PermissionError:
        raise AudioDecodeError(shown, "permission denied") from None
    except IsADirectoryError:
        raise AudioDecodeError(shown, "is a directory, not an audio file") from None
    except Exception as e:  # the store's own errors (credentials, network) vary by library
        raise AudioDecodeError(shown, f"cannot open ({redact(str(e)) or type(e).__name__})") from None
    if getattr(f, "size", None) == 0:
        f.close()
        raise AudioDecodeError(shown, "empty file (0 bytes)")
    return f


def _opener(item: AudioItem, shown: str) -> Callable[[], IO[bytes]] | None:
    """How to open a non-local item (bytes payload or URL); None for a local file (checked here)."""
    data = item.data
    if data is not None:
        if not data:
            raise AudioDecodeError(shown, "empty audio payload (0 bytes)")
        return lambda: io.BytesIO(data)
    if is_url(item.path):
        return lambda: _open_url(item.path, shown)
    _check_file(item.path, item.source)
    return None


def _beyond_end(path: str, offset: float, total_s: float) -> AudioDecodeError:
    return AudioDecodeError(path, f"offset {float(offset)} s is beyond the end ({_fmt_s(total_s)} s)")


def _read_soundfile(f: sf.SoundFile, item: AudioItem, offset: float, duration: float | None, path: str) -> DecodedAudio:
    sr, channels = int(f.samplerate), int(f.channels)
    if sr <= 0 or channels <= 0:
        raise AudioDecodeError(path, f"not decodable audio: bad header ({sr} Hz, {channels} channels)")
    frames = int(f.frames)
    known = 0 < frames < (1 << 62)
    start = round(offset * sr)
    if known and offset > 0 and start >= frames:
        raise _beyond_end(path, offset, frames / sr)
    want = round(duration * sr) if duration is not None else None
    if known:
        avail = max(frames - start, 0)
        want = avail if want is None else min(want, avail)
    out = _Resampled(path, sr, want)
    block = max(BLOCK_SECONDS * sr, 1)
    if start > 0:
        if f.seekable():
            f.seek(start)
        else:
            skip = start
            while skip > 0:
                got = f.read(min(block, skip), dtype="float32", always_2d=True).shape[0]
                if got == 0:
                    raise _beyond_end(path, offset, (start - skip) / sr)
                skip -= got
    remaining = want
    while remaining is None or remaining > 0:
        n = block if remaining is None else min(block, remaining)
        data = f.read(n, dtype="float32", always_2d=True)
        if data.shape[0] == 0:
            break
        out.push(data)
        if remaining is not None:
            remaining -= data.shape[0]
    if out.frames_in == 0 and offset > 0:
        raise _beyond_end(path, offset, start / sr)
    return DecodedAudio(item=item, samples=out.finish(), source_sample_rate=sr, source_channels=channels)


def _frame_block(resampler: Any, frame: Any) -> list[np.ndarray]:
    """One decoded frame (any sample format/layout) as (frames, channels) float32 blocks."""
    return [f.to_ndarray().T for f in resampler.resample(frame)]


def _read_pyav(item: AudioItem, offset: float, duration: float | None, path: str, src: Any) -> DecodedAudio:
    """The first audio stream of anything FFmpeg (bundled in PyAV) opens, through the same block pipeline.

    Decodes from the start and drops samples before ``offset`` (exact whatever the container's
    seeking precision); frames are gathered into ~1-s blocks so soxr sees few, large calls. ``src`` is
    the local path or an open file object (a URL's ranged reader, a bytes payload).
    """
    import av  # only when libsndfile cannot open the file

    with av.open(src, metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise AudioDecodeError(path, f"not decodable audio: no audio stream in {container.format.name} container")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        sr = int(ctx.sample_rate or 0)
        channels = int(ctx.channels or 0)
        if sr <= 0 or channels <= 0:
            raise AudioDecodeError(path, f"not decodable audio: bad stream parameters ({sr} Hz, {channels} channels)")
        # Planar float32 at the stream's own rate and layout: libswresample only converts the sample
        # format (s16, s32, fltp, ...), downmix and resampling stay ours (the soundfile path's).
        resampler = av.AudioResampler(format="fltp", layout=ctx.layout, rate=sr)
        start = round(offset * sr)
        want = round(duration * sr) if duration is not None else None
        out = _Resampled(path, sr, want)
        seen = 0  # source frames decoded so far, including skipped ones
        pending: list[np.ndarray] = []
        pending_n = 0
        done = False

        def take(block: np.ndarray) -> None:
            nonlocal seen, pending_n, done
            lo, hi = seen, seen + block.shape[0]
            seen = hi
            if hi <= start or done:
                return
            a = max(start - lo, 0)
            b = block.shape[0] if want is None else min(block.shape[0], start + want - lo)
            if b > a:
                pending.append(block[a:b])
                pending_n += b - a
            if want is not None and hi >= start + want:
                done = True

        def drain() -> None:
            nonlocal pending_n
            if pending:
                out.push(np.concatenate(pending) if len(pending) > 1 else np.ascontiguousarray(pending[0]))
                pending.clear()
                pending_n = 0

        for frame in container.decode(stream):
            for block in _frame_block(resampler, frame):
                take(block)
            if pending_n >= sr:
                drain()
            if done:
                break
        if not done:
            for block in _frame_block(resampler, None):
                take(block)
        drain()
    if out.frames_in == 0 and offset > 0:
        raise _beyond_end(path, offset, seen / sr)
    return DecodedAudio(item=item, samples=out.finish(), source_sample_rate=sr, source_channels=channels)


# libsndfile's words when its MPEG reader gives up on a file named .mp3 that is not MPEG audio: the file
# is there, so flamingo says what libsndfile says of the same bytes from memory.
SF_NOT_A_FILE = "File does not exist or is not a regular file"


def _sf_reason(e: Exception, local: str | None = None) -> str:
    """libsndfile's reason; ``local``: the local path it read, when there was one."""
    text = (getattr(e, "error_string", None) or str(e) or type(e).__name__).strip()
    if local is not None and text.startswith(SF_NOT_A_FILE) and os.path.isfile(local):
        return "Format not recognised."
    return text


def _av_reason(e: Exception) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without the repeated path."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return redact(str(text).strip())


def _pyav_fallback(
    item: AudioItem,
    offset: float,
    duration: float | None,
    path: str,
    opener: Callable[[], IO[bytes]] | None,
    sf_err: Exception,
) -> DecodedAudio:
    """Decode with PyAV after libsndfile failed; when both fail, the error gives both reasons."""
    local = item.path if opener is None else None
    try:
        if opener is None:
            return _read_pyav(item, offset, duration, path, item.path)
        with contextlib.closing(opener()) as f:
            return _read_pyav(item, offset, duration, path, f)
    except (AudioDecodeError, MemoryError):
        raise
    except Exception as av_err:
        raise AudioDecodeError(
            path,
            f"not decodable audio: soundfile: {redact(_sf_reason(sf_err, local))}; ffmpeg: {_av_reason(av_err)}",
        ) from None


def decode(item: AudioItem) -> DecodedAudio:
    """Decode the item (its ``data`` bytes, its URL or its local path; from item.offset, for
    item.duration seconds) to 16 kHz mono float32."""
    path = shown_path(item)
    opener = _opener(item, path)
    offset, duration = _segment(item, path)
    decoded: DecodedAudio | None = None
    with contextlib.ExitStack() as stack:
        try:
            try:
                # A local path as bytes: libsndfile gets the file's real name even when it is not valid
                # UTF-8 (the str carries those bytes as surrogateescape code points, which it cannot encode).
                src = os.fsencode(item.path) if opener is None else stack.enter_context(contextlib.closing(opener()))
                f = sf.SoundFile(src)
            except AudioDecodeError:
                raise
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_err:
                # libsndfile cannot open it (m4a/aac, wma, amr, ... or garbage): FFmpeg through PyAV.
                stack.close()
                decoded = _pyav_fallback(item, offset, duration, path, opener, sf_err)
            else:
                try:
                    with f:
                        decoded = _read_soundfile(f, item, offset, duration, path)
                except sf.LibsndfileError as sf_err:
                    # It opened but failed mid-stream: e.g. a FLAC whose STREAMINFO claims more samples
                    # than it holds makes libsndfile's seek past the real end fail. FFmpeg reads what is there.
                    stack.close()
                    decoded = _pyav_fallback(item, offset, duration, path, opener, sf_err)
        except AudioDecodeError:
            raise
        except MemoryError:
            raise
        except Exception as e:
            raise AudioDecodeError(path, f"not decodable audio: {redact(_sf_reason(e))}") from None
    assert decoded is not None
    if decoded.samples.shape[0] == 0:
        raise AudioDecodeError(path, "no audio samples")
    return decoded


def probe_duration(src: str | AudioItem) -> float | None:
    """Duration in seconds from the header alone (libsndfile, else FFmpeg's container), or None when it
    cannot tell. An estimate for planning only: decode() never trusts it.

    ``src`` is a local path or an item (its bytes, its URL: a ranged read of the header, or its path)."""
    try:
        if isinstance(src, str):
            info = sf.info(os.fsencode(src))
        elif src.data is not None:
            info = sf.info(io.BytesIO(src.data))
        elif is_url(src.path):
            with open_binary(src.path) as f:
                info = sf.info(f)
        else:
            info = sf.info(os.fsencode(src.path))
    except Exception:
        return _probe_pyav(src)
    frames, sr = int(info.frames), int(info.samplerate)
    if sr <= 0 or not 0 < frames < (1 << 62):
        return None
    return frames / sr


def _probe_pyav(src: str | AudioItem) -> float | None:
    try:
        import av

        with contextlib.ExitStack() as stack:
            if isinstance(src, str):
                target: Any = src
            elif src.data is not None:
                target = io.BytesIO(src.data)
            elif is_url(src.path):
                target = stack.enter_context(open_binary(src.path))
            else:
                target = src.path
            container = stack.enter_context(av.open(target, metadata_errors="ignore"))
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / 1_000_000  # AV_TIME_BASE
            else:
                return None
    except Exception:
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


# --- writing (doctor, demo and tests make real files in the formats only FFmpeg reads) ----------------

# extension -> (FFmpeg container, encoder, sample rate, channels); every encoder is bundled in the av wheel.
FFMPEG_ENCODINGS: dict[str, tuple[str, str, int, int]] = {
    ".mp2": ("mp2", "mp2", 44100, 2),
    ".m4a": ("ipod", "aac", 44100, 2),
    ".aac": ("adts", "aac", 22050, 1),
    ".wma": ("asf", "wmav2", 44100, 2),
    ".webm": ("webm", "libopus", 48000, 2),
    ".amr": ("amr", "libopencore_amrnb", 8000, 1),
    ".mp4": ("mp4", "libopus", 48000, 1),  # Opus in MP4
    ".oga": ("ogg", "libopus", 48000, 2),  # Ogg Opus under the .oga name
    ".mka": ("matroska", "flac", 32000, 2),
    ".ac3": ("ac3", "ac3", 48000, 2),
}


def write_ffmpeg(path: str | os.PathLike[str], data: np.ndarray) -> None:
    """Encode ``data`` ((channels, samples) float32 at the rate FFMPEG_ENCODINGS gives for the
    extension of ``path``) with PyAV's bundled FFmpeg."""
    import av

    fmt, codec, sr, channels = FFMPEG_ENCODINGS[os.path.splitext(os.fspath(path))[1].lower()]
    if data.ndim != 2 or data.shape[0] != channels:
        raise ValueError(f"{path}: expected ({channels}, samples) audio, got {data.shape}")
    layout = "stereo" if channels == 2 else "mono"
    with av.open(os.fspath(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr)
        stream.layout = layout
        if codec == "wmav2":
            stream.bit_rate = 96000  # its default (0) does not open
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.codec.audio_formats[0].name, layout=layout, rate=sr)
        step, pts = ctx.frame_size or 1024, 0
        for i in range(0, data.shape[1], step):
            block = np.ascontiguousarray(data[:, i : i + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, pts
            pts += frame.samples
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        for f in resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
