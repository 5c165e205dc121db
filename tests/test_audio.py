"""audio.decode: any format/rate/channel count to 16 kHz mono float32, with clear errors."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from audiogen import ENCODINGS, encode

from flamingo_cli import audio
from flamingo_cli.audio import AudioDecodeError, decode, probe_duration
from flamingo_cli.records import SAMPLE_RATE, AudioItem

# (format, subtype, file extension)
FORMATS = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
RATES = [8000, 22050, 44100, 48000, 96000]
CHANNELS = [1, 2, 6]


def sine(sr: int, seconds: float, freq: float = 1000.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, data: np.ndarray, sr: int, ext: str, subtype: str | None = None) -> Path:
    fmt, default_subtype = FORMATS[ext]
    sf.write(str(path), data, sr, format=fmt, subtype=subtype or default_subtype)
    return path


def item(path: Path | str, offset: float = 0.0, duration: float | None = None) -> AudioItem:
    return AudioItem(id="a", path=str(path), offset=offset, duration=duration)


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(x))


def mp3_can_write(sr: int, channels: int) -> bool:
    return sf.check_format("MP3", "MPEG_LAYER_III") and sr <= 48000 and channels <= 2


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("sr", RATES)
@pytest.mark.parametrize("ext", list(FORMATS))
def test_formats_rates_channels(tmp_path: Path, ext: str, sr: int, channels: int) -> None:
    if ext == "mp3" and not mp3_can_write(sr, channels):
        pytest.skip(f"MP3 cannot hold {sr} Hz / {channels} channels")
    seconds = 2.0
    mono = sine(sr, seconds)
    data = np.repeat(mono[:, None], channels, axis=1)
    path = write(tmp_path / f"a.{ext}", data, sr, ext)

    d = decode(item(path))
    y = d.samples
    assert y.dtype == np.float32
    assert y.ndim == 1
    assert y.flags["C_CONTIGUOUS"]
    assert abs(len(y) - seconds * SAMPLE_RATE) <= 1
    assert d.source_sample_rate == sr
    assert d.source_channels == channels
    assert d.item.path == str(path)
    assert abs(peak_hz(y) - 1000.0) < 2.0
    # Same as reading everything at once, averaging the channels and resampling in one go.
    full, _ = sf.read(str(path), dtype="float32", always_2d=True)
    ref = soxr.resample(full.mean(axis=1), sr, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(y, ref, atol=1e-6)
    if not (ext == "ogg" and channels == 6):  # Vorbis 5.1 low-passes its LFE channel: 1 kHz is gone
        rms = float(np.sqrt(np.mean(y[1000:-1000] ** 2)))
        assert rms == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_matches_librosa_load(tmp_path: Path) -> None:
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    data = (0.3 * rng.standard_normal((44100 * 3 + 17, 2))).astype(np.float32)
    path = write(tmp_path / "a.wav", data, 44100, "wav", "FLOAT")
    # librosa truncates offset * sr (0.7 * 44100 -> 30869); decode rounds (30870): use exact offsets.
    ours = decode(item(path, offset=0.5, duration=1.5)).samples
    ref, _ = librosa.load(str(path), sr=16000, mono=True, offset=0.5, duration=1.5, res_type="soxr_hq")
    assert len(ours) == len(ref)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_mono_is_mean_of_channels(tmp_path: Path) -> None:
    n = SAMPLE_RATE * 2
    data = np.stack([np.full(n, 0.6), np.full(n, -0.2), np.full(n, 0.2)], axis=1).astype(np.float32)
    path = write(tmp_path / "a.wav", data, SAMPLE_RATE, "wav", "FLOAT")
    y = decode(item(path)).samples
    assert len(y) == n  # 16 kHz in: no resampling
    np.testing.assert_allclose(y, 0.2, atol=1e-6)


def test_block_streaming_equals_one_shot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files longer than one block are read in blocks and resampled as a stream, bit for bit."""
    sr = 44100
    x = (0.3 * np.random.default_rng(1).standard_normal(sr * 7 + 123)).astype(np.float32)
    path = write(tmp_path / "a.wav", x, sr, "wav", "FLOAT")
    reads: list[int] = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(audio, "BLOCK_SECONDS", 1)
    monkeypatch.setattr(sf.SoundFile, "read", spy)
    y = decode(item(path)).samples
    assert len(reads) >= 8 and max(reads) == sr  # bounded blocks, never "read everything"
    expected = soxr.resample(x, sr, SAMPLE_RATE, quality="HQ")
    assert len(y) == len(expected)
    np.testing.assert_array_equal(y, expected)


def test_offset_and_duration_read_the_right_span(tmp_path: Path) -> None:
    n = SAMPLE_RATE * 10
    ramp = (np.arange(n) / n).astype(np.float32)  # value encodes position
    path = write(tmp_path / "ramp.wav", ramp, SAMPLE_RATE, "wav", "FLOAT")
    y = decode(item(path, offset=2.5, duration=3.0)).samples
    assert len(y) == 3 * SAMPLE_RATE
    np.testing.assert_array_equal(y, ramp[int(2.5 * SAMPLE_RATE) : int(5.5 * SAMPLE_RATE)])
    # Offset only: to the end.
    assert len(decode(item(path, offset=9.0)).samples) == SAMPLE_RATE
    # Duration past the end: stops at the end, no error.
    assert len(decode(item(path, offset=8.0, duration=5.0)).samples) == 2 * SAMPLE_RATE


@pytest.mark.parametrize(("ext", "sr"), [("wav", 48000), ("flac", 22050), ("ogg", 44100), ("mp3", 44100)])
def test_offset_segments_resampled(tmp_path: Path, ext: str, sr: int) -> None:
    if ext == "mp3" and not mp3_can_write(sr, 1):
        pytest.skip("soundfile cannot write MP3 here")
    # 4 s at 500 Hz then 4 s at 2000 Hz: the segment tells which half was read.
    x = np.concatenate([sine(sr, 4.0, 500.0), sine(sr, 4.0, 2000.0)])
    path = write(tmp_path / f"two.{ext}", x, sr, ext)
    first = decode(item(path, offset=0.5, duration=3.0)).samples
    second = decode(item(path, offset=4.5, duration=3.0)).samples
    for seg in (first, second):
        assert abs(len(seg) - 3 * SAMPLE_RATE) <= 1
    assert abs(peak_hz(first) - 500.0) < 2.0
    assert abs(peak_hz(second) - 2000.0) < 2.0


def test_offset_beyond_end(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", sine(8000, 60.0), 8000, "wav")
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path, offset=90.0))
    assert e.value.reason == "offset 90.0 s is beyond the end (60.0 s)"
    assert str(e.value) == f"{path}: offset 90.0 s is beyond the end (60.0 s)"
    assert e.value.path == str(path)
    with pytest.raises(AudioDecodeError, match="beyond the end"):
        decode(item(path, offset=60.0))


def test_negative_offset_and_bad_duration(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", sine(8000, 1.0), 8000, "wav")
    with pytest.raises(AudioDecodeError, match="invalid offset"):
        decode(item(path, offset=-1.0))
    with pytest.raises(AudioDecodeError, match="invalid duration"):
        decode(item(path, duration=0.0))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason == "file not found"
    assert str(e.value).startswith(str(path))


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "x.wav"
    path.mkdir()
    with pytest.raises(AudioDecodeError, match="is a directory"):
        decode(item(path))


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason == "empty file (0 bytes)"


def test_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path / "a.wav", sine(8000, 1.0), 8000, "wav")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        with pytest.raises(AudioDecodeError) as e:
            decode(item(path))
        assert e.value.reason == "permission denied"
    finally:
        os.chmod(path, 0o644)


def test_truncated_header(tmp_path: Path) -> None:
    good = write(tmp_path / "good.wav", sine(8000, 1.0), 8000, "wav")
    path = tmp_path / "trunc.wav"
    path.write_bytes(good.read_bytes()[:20])
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason.startswith("not decodable audio")
    assert "soundfile:" in e.value.reason and "ffmpeg:" in e.value.reason


def test_truncated_data_decodes_what_is_there(tmp_path: Path) -> None:
    good = write(tmp_path / "good.wav", sine(16000, 2.0), 16000, "wav")
    path = tmp_path / "half.wav"
    raw = good.read_bytes()
    path.write_bytes(raw[: 44 + (len(raw) - 44) // 2])  # header promises 2 s, data holds 1 s
    y = decode(item(path)).samples
    assert abs(len(y) - SAMPLE_RATE) <= 1


def test_text_file_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason.startswith("not decodable audio")
    assert str(e.value).startswith(f"{path}: not decodable audio")


def test_text_file_named_mp3_is_not_called_missing(tmp_path: Path) -> None:
    """libsndfile's MPEG reader answers a file named .mp3 that is not MPEG audio with "File does not
    exist or is not a regular file"; the file is there, so the reason says the format is unknown."""
    path = tmp_path / "broken.mp3"
    path.write_bytes(b"not audio")
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason.startswith("not decodable audio: soundfile: Format not recognised.; ffmpeg: ")
    assert "does not exist" not in e.value.reason


def test_png_bytes_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "image.wav"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    with pytest.raises(AudioDecodeError, match="not decodable audio"):
        decode(item(path))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples(tmp_path: Path, bad: float) -> None:
    x = sine(16000, 1.0)
    x[5000] = bad
    path = write(tmp_path / "nan.wav", x, 16000, "wav", "FLOAT")
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason == "audio contains NaN or infinite samples"


def test_nan_in_one_channel_only(tmp_path: Path) -> None:
    x = np.stack([sine(44100, 1.0), sine(44100, 1.0)], axis=1)
    x[100, 1] = np.nan
    path = write(tmp_path / "nan2.wav", x, 44100, "wav", "FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN or infinite"):
        decode(item(path))


def test_no_samples(tmp_path: Path) -> None:
    path = write(tmp_path / "silent.wav", np.zeros((0, 1), dtype=np.float32), 16000, "wav")
    assert path.stat().st_size > 0
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.reason == "no audio samples"


def test_pyav_fallback_matches_soundfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files libsndfile cannot open go through PyAV with the same downmix + soxr; force it on a WAV."""
    sr = 22050
    x = np.stack([sine(sr, 3.0), sine(sr, 3.0, freq=440.0)], axis=1)
    path = write(tmp_path / "a.wav", x, sr, "wav")
    direct = decode(item(path, offset=0.5, duration=2.0)).samples
    whole = decode(item(path)).samples

    def refuse(*args, **kwargs):
        raise RuntimeError("Format not recognised.")

    monkeypatch.setattr(audio.sf, "SoundFile", refuse)
    d = decode(item(path, offset=0.5, duration=2.0))
    assert d.source_sample_rate == sr and d.source_channels == 2
    assert d.samples.dtype == np.float32
    assert len(d.samples) == len(direct) == 2 * SAMPLE_RATE
    np.testing.assert_allclose(d.samples, direct, atol=1e-6)
    np.testing.assert_allclose(decode(item(path)).samples, whole, atol=1e-6)
    with pytest.raises(AudioDecodeError, match="beyond the end"):
        decode(item(path, offset=10.0))


@pytest.mark.parametrize("ext", sorted(ENCODINGS))
def test_pyav_formats_decode_without_system_ffmpeg(tmp_path: Path, ext: str) -> None:
    """mp2, m4a/aac, wma, webm, amr, opus-in-mp4, oga, ...: decoded by the bundled FFmpeg (or libsndfile)."""
    _, _, sr, channels = ENCODINGS[ext]
    path = encode(tmp_path / f"tone{ext}", seconds=2.0, freq=1000.0)
    d = decode(item(path))
    assert d.samples.dtype == np.float32 and d.samples.ndim == 1
    assert d.source_sample_rate == sr and d.source_channels == channels
    assert abs(d.duration_s - 2.0) < 0.15  # encoder priming/padding only
    mid = d.samples[SAMPLE_RATE // 4 : SAMPLE_RATE + SAMPLE_RATE // 4]
    assert abs(peak_hz(mid) - 1000.0) <= 2.0
    seg = decode(item(path, offset=0.5, duration=1.0)).samples
    assert len(seg) == SAMPLE_RATE
    assert abs(peak_hz(seg) - 1000.0) <= 2.0
    with pytest.raises(AudioDecodeError, match="beyond the end"):
        decode(item(path, offset=30.0))


def test_pyav_both_decoders_fail_names_both(tmp_path: Path) -> None:
    path = tmp_path / "noise.m4a"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert e.value.path == str(path)
    assert e.value.reason.startswith("not decodable audio: soundfile: ")
    assert "; ffmpeg: " in e.value.reason


def test_container_without_audio_stream(tmp_path: Path) -> None:
    import av

    path = tmp_path / "video.webm"
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioDecodeError) as e:
        decode(item(path))
    assert "no audio stream" in e.value.reason


def lying_flac(tmp_path: Path, seconds: float = 2.0, sr: int = 44100) -> Path:
    """A real FLAC whose STREAMINFO total-samples field (36 bits) claims 2^36 - 1 samples (~18 days)."""
    good = write(tmp_path / "good.flac", sine(sr, seconds), sr, "flac")
    raw = bytearray(good.read_bytes())
    assert raw[:4] == b"fLaC" and raw[4] & 0x7F == 0  # first metadata block is STREAMINFO
    # STREAMINFO starts at byte 8; its bytes 10..17 pack rate(20) channels(3) bps(5) total samples(36).
    packed = int.from_bytes(raw[18:26], "big")
    assert packed & ((1 << 36) - 1) == round(sr * seconds)
    raw[18:26] = (packed | ((1 << 36) - 1)).to_bytes(8, "big")
    path = tmp_path / "lies.flac"
    path.write_bytes(bytes(raw))
    assert sf.info(str(path)).frames == (1 << 36) - 1
    return path


def test_header_that_lies_about_length_decodes_the_real_audio(tmp_path: Path) -> None:
    """Used to be MemoryError: Unable to allocate 512 GiB. Allocation is bounded; the real 2 s come out."""
    import tracemalloc

    path = lying_flac(tmp_path)
    tracemalloc.start()
    try:
        d = decode(item(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(d.duration_s - 2.0) < 1e-3
    assert abs(peak_hz(d.samples) - 1000.0) <= 2.0
    assert peak < 2 * audio.MAX_PREALLOC_SAMPLES * 4  # a bounded preallocation, not the header's size
    seg = decode(item(path, offset=1.0, duration=0.5)).samples
    assert len(seg) == SAMPLE_RATE // 2


def test_non_utf8_file_name(tmp_path: Path) -> None:
    """A Latin-1 byte in a name (os.fsdecode keeps it as a surrogate) opens with both decoders."""
    name = os.fsdecode(b"caf\xe9")
    wav = write(tmp_path / "x.wav", sine(16000, 1.0), 16000, "wav")
    odd_wav = os.path.join(str(tmp_path), name + ".wav")
    os.rename(wav, odd_wav)
    assert len(decode(item(odd_wav)).samples) == SAMPLE_RATE
    odd_m4a = os.path.join(str(tmp_path), name + ".m4a")
    os.rename(encode(tmp_path / "y.m4a", seconds=1.0), odd_m4a)
    assert abs(decode(item(odd_m4a)).duration_s - 1.0) < 0.1


def test_probe_duration(tmp_path: Path) -> None:
    wav = write(tmp_path / "a.wav", sine(44100, 2.5), 44100, "wav")
    flac = write(tmp_path / "a.flac", sine(48000, 1.25), 48000, "flac")
    assert probe_duration(str(wav)) == pytest.approx(2.5)
    assert probe_duration(str(flac)) == pytest.approx(1.25)
    text = tmp_path / "t.wav"
    text.write_text("nope")
    assert probe_duration(str(text)) is None
    assert probe_duration(str(tmp_path / "missing.wav")) is None


def test_thread_safe(tmp_path: Path) -> None:
    paths = []
    for i, (sr, ch) in enumerate([(8000, 1), (22050, 2), (44100, 6), (48000, 2), (96000, 1)] * 2):
        x = np.repeat(sine(sr, 1.5, freq=300.0 + 100 * i)[:, None], ch, axis=1)
        paths.append(write(tmp_path / f"t{i}.flac", x, sr, "flac"))
    items = [item(p, offset=0.25) for p in paths] * 4
    sequential = [decode(it).samples for it in items]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = [d.samples for d in pool.map(decode, items)]
    for a, b in zip(sequential, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_probe_duration_of_formats_only_ffmpeg_reads(tmp_path: Path) -> None:
    for ext in (".m4a", ".wma", ".amr", ".webm"):
        path = encode(tmp_path / f"t{ext}", seconds=3.0)
        assert probe_duration(str(path)) == pytest.approx(3.0, abs=0.1)
    assert probe_duration(str(lying_flac(tmp_path))) is not None  # a planning estimate only
