"""Cheap measures of decoded audio, and what needs no GPU request: silence and duplicate audio.

Per chunk of 16 kHz mono float audio (``measure``): its level (``rms_dbfs``, ``peak_dbfs``), the share of
20 ms frames above a fixed level (``active_ratio``) and a hash of its samples (``audio_sha256``); with
``--vad`` also Silero VAD's speech share and spans (``Vad``). They become columns of every chunk row.

Two gates keep chunks away from the engine (docs/output.md, "Gates", has the rules and defaults):

* silence (``GateSettings.silent``): a chunk whose peak is below ``silence_peak_db`` or whose
  ``active_ratio`` is at most ``silence_active_ratio`` gets an outcome row (caption and error null,
  ``gate = "silence"``) unless ``keep_silence``;
* duplicates (``Deduper``): a chunk whose samples (and prompt) are those of an earlier chunk of the
  same run — in this invocation or an earlier one — is captioned once; the others get rows that copy
  the original's answer and name it (``gate = "duplicate"``, ``duplicate_of``, ``duplicate_of_chunk``).
  A duplicate whose original is still in flight waits (parked) until its result is written.

Nothing here imports torch (Silero, and torch with it, loads on the first ``--vad`` chunk) or does I/O:
the executor hands the ``Deduper`` a ``fetch`` for answers that are no longer in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flamingo_cli.records import SAMPLE_RATE, Chunk, Request, Result

FRAME_S = 0.02  # active_ratio's frames: 20 ms, without overlap (a short chunk is one frame)
ACTIVE_FRAME_DBFS = -50.0  # a frame is active when its RMS reaches this level
FLOOR_DBFS = -120.0  # levels are clamped here: digital silence (log of 0) reads -120.0, never -inf
DEFAULT_SILENCE_PEAK_DB = -60.0
DEFAULT_SILENCE_ACTIVE_RATIO = 0.0
SILENCE = "silence"
DUPLICATE = "duplicate"
PARKED = object()  # GateKeeper.route's answer for a duplicate whose original is still in flight


# --- measures ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Measures:
    """What ``measure`` (and the VAD) found in one chunk; ``gate`` is set when the chunk is not sent."""

    rms_dbfs: float
    peak_dbfs: float
    active_ratio: float
    audio_sha256: str
    speech_ratio: float | None = None
    speech_segments: list[dict[str, float]] | None = None
    gate: str | None = None


def dbfs(amplitude: float) -> float:
    """20·log10 of a linear level against full scale 1.0, clamped at ``FLOOR_DBFS`` (a full-scale sine's
    RMS reads -3.01 dBFS)."""
    if not amplitude > 0.0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, 20.0 * math.log10(amplitude))


def audio_hash(samples: np.ndarray) -> str:
    """sha256 of the samples as little-endian float32 (the decoded PCM: a WAV and its FLAC agree)."""
    pcm = np.ascontiguousarray(samples, dtype="<f4")
    return hashlib.sha256(memoryview(pcm).cast("B")).hexdigest()


def measure(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Measures:
    """Level, activity and hash of one chunk's samples (float, full scale 1.0)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.size == 0:
        return Measures(FLOOR_DBFS, FLOOR_DBFS, 0.0, audio_hash(x))
    x64 = x.astype(np.float64)
    square = x64 * x64
    rms = math.sqrt(float(square.mean()))
    peak = float(np.abs(x64).max())
    frame = max(1, round(FRAME_S * sample_rate))
    n = max(1, x.size // frame)
    frames = square[: n * frame].reshape(n, -1) if x.size >= frame else square.reshape(1, -1)
    level = 10.0 ** (ACTIVE_FRAME_DBFS / 10.0)  # the frame threshold as a mean square
    active = float(np.count_nonzero(frames.mean(axis=1) >= level)) / frames.shape[0]
    return Measures(dbfs(rms), dbfs(peak), active, audio_hash(x))


# --- voice activity (optional) ----------------------------------------------------------------------


class VadNotInstalledError(RuntimeError):
    """--vad without the silero-vad package."""


class Vad:
    """Silero VAD (the ``silero-vad`` package's TorchScript model, shipped in its wheel: no download).

    One model per thread (the model keeps state between windows), loaded on first use. ``speech``
    returns the chunk's speech share and its spans in seconds from ``origin_s``.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._local = threading.local()

    def _model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            try:
                from silero_vad import load_silero_vad
            except ImportError as exc:
                raise VadNotInstalledError(
                    "--vad needs the silero-vad package: install flamingo with the 'vad' extra "
                    "(uv sync --extra vad, or pip install silero-vad)"
                ) from exc
            with warnings.catch_warnings():  # importlib.resources' and torch.jit.load's deprecation notes
                warnings.simplefilter("ignore", DeprecationWarning)
                model = self._local.model = load_silero_vad(onnx=False)
        return model

    def speech(self, samples: np.ndarray, origin_s: float = 0.0) -> tuple[float, list[dict[str, float]]]:
        import torch
        from silero_vad import get_speech_timestamps

        x = np.ascontiguousarray(samples, dtype=np.float32)
        if x.size == 0:
            return 0.0, []
        model = self._model()
        with torch.inference_mode():
            spans = get_speech_timestamps(
                torch.from_numpy(x), model, threshold=self.threshold, sampling_rate=SAMPLE_RATE
            )
        speech = sum(s["end"] - s["start"] for s in spans)
        segments = [
            {"start_s": origin_s + s["start"] / SAMPLE_RATE, "end_s": origin_s + s["end"] / SAMPLE_RATE} for s in spans
        ]
        return min(1.0, speech / x.size), segments


def check_vad() -> None:
    """Raise VadNotInstalledError now (before a model loads) when --vad cannot run."""
    import importlib.util

    if importlib.util.find_spec("silero_vad") is None:
        raise VadNotInstalledError(
            "--vad needs the silero-vad package: install flamingo with the 'vad' extra "
            "(uv sync --extra vad, or pip install silero-vad)"
        )


# --- the settings, per chunk ------------------------------------------------------------------------


@dataclass(frozen=True)
class GateSettings:
    """The gates of one run (``spec.CaptionSpec.gates``)."""

    keep_silence: bool = False
    silence_peak_db: float = DEFAULT_SILENCE_PEAK_DB
    silence_active_ratio: float = DEFAULT_SILENCE_ACTIVE_RATIO
    dedupe_audio: bool = True
    vad: bool = False
    _vad: Vad = dataclasses.field(default_factory=Vad, compare=False, repr=False)

    def silent(self, m: Measures) -> bool:
        """Silent by the thresholds: peak below ``silence_peak_db`` or active_ratio ≤ ``silence_active_ratio``."""
        return m.peak_dbfs < self.silence_peak_db or m.active_ratio <= self.silence_active_ratio

    def apply(self, chunk: Chunk) -> Measures:
        """Measure the chunk (and run the VAD); mark it gated as silence when it is and that is on."""
        assert chunk.samples is not None
        m = measure(chunk.samples)
        if self.vad:
            m.speech_ratio, m.speech_segments = self._vad.speech(chunk.samples, chunk.item.offset + chunk.start_s)
        if not self.keep_silence and self.silent(m):
            m.gate = SILENCE
        chunk.measures = m
        return m


# --- duplicates -------------------------------------------------------------------------------------

# Result fields a duplicate does not copy from its original: its own chunk and prompt, the gate's own
# fields, and the token ids (parity checks only).
_OWN = frozenset(["chunk", "prompt", "prompt_token_ids", "token_ids", "gate", "duplicate_of", "duplicate_of_chunk"])
_COPIED = tuple(f.name for f in dataclasses.fields(Result) if f.name not in _OWN)


def _key(audio_sha256: str, prompt: str) -> bytes:
    """What must match for two chunks to share one caption: the samples and the prompt (16 bytes)."""
    return hashlib.blake2b(f"{audio_sha256}\0{prompt}".encode(), digest_size=16).digest()


def audio_key(audio_sha256: str) -> bytes:
    """The resume index's key for an audio hash (16 bytes of it: a million rows stay small)."""
    return bytes.fromhex(audio_sha256)[:16]


def answer_of(result: Result) -> dict[str, Any]:
    """The part of a result a duplicate copies (never the samples)."""
    return {name: getattr(result, name) for name in _COPIED}


def answer_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The same from a stored row (``fetch``'s answer): the Result fields that are columns."""
    return {name: row.get(name) for name in _COPIED if name in row}


def duplicate_result(request: Request, original: tuple[str, int], answer: Mapping[str, Any]) -> Result:
    """The row of a duplicate: the original's answer (or an error naming it when it failed)."""
    values = dict(answer)
    error = values.get("error")
    if error is not None:
        values = {"error": f"duplicate of {original[0]!r} chunk {original[1]}, which failed: {error}"}
    return Result(
        chunk=request.chunk,
        prompt=request.prompt,
        **values,
        gate=DUPLICATE,
        duplicate_of=original[0],
        duplicate_of_chunk=int(original[1]),
    )


class Deduper:
    """Which chunk of a run is captioned for each distinct (audio, prompt); the rest copy its answer.

    ``claim`` is called in input order (the executor's one producer), so the original is always the
    first such chunk in input order — or the one an earlier invocation captioned (``on_disk``: the
    resume index's ``audio_original``, audio hash -> (id, chunk)). Answers of this invocation's
    originals stay in memory for the last ``cache`` of them; older ones, and those on disk, come from
    ``fetch(id, chunk)`` (a stored row as a dict, or None), read only when a duplicate needs one.
    """

    def __init__(
        self,
        on_disk: Callable[[str], tuple[str, int] | None] | None = None,
        fetch: Callable[[str, int], Mapping[str, Any] | None] | None = None,
        cache: int = 4096,
    ) -> None:
        self._on_disk, self._fetch, self._cache_size = on_disk, fetch, cache
        self._lock = threading.Lock()
        self._first: dict[bytes, tuple[str, int]] = {}  # (audio, prompt) -> original of this invocation
        self._flying: set[tuple[str, int]] = set()  # originals sent and not yet answered
        self._parked: dict[tuple[str, int], list[Request]] = {}
        self._answers: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    @property
    def parked(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._parked.values())

    def claim(self, request: Request) -> Result | object | None:
        """None: ``request`` is an original, send it. A Result: its duplicate row, to write now. PARKED:
        its original is in flight; ``resolved`` hands the row back once the original's result is in."""
        chunk = request.chunk
        m = chunk.measures
        if m is None:
            return None
        key = _key(m.audio_sha256, request.prompt)
        with self._lock:
            original = self._first.get(key)
            if original is not None and original != chunk.key:
                if original in self._flying:
                    self._parked.setdefault(original, []).append(request)
                    return PARKED
                answer = self._answers.get(original)
                if answer is not None:
                    self._answers.move_to_end(original)
                    return duplicate_result(request, original, answer)
        if original is None:
            original = self._on_disk(m.audio_sha256) if self._on_disk is not None else None
            if original == chunk.key:
                original = None
        if original is not None and original != chunk.key:
            row = self._fetch(*original) if self._fetch is not None else None
            if row is not None and row.get("prompt") == request.prompt and row.get("error") is None:
                with self._lock:
                    self._first.setdefault(key, original)
                return duplicate_result(request, original, answer_from_row(row))
        with self._lock:  # the original: the first of its kind
            self._first[key] = chunk.key
            self._flying.add(chunk.key)
        return None

    def resolved(self, result: Result) -> list[Result]:
        """The original's result is written: the rows of the duplicates parked on it (maybe none)."""
        key = result.chunk.key
        with self._lock:
            if key not in self._flying:
                return []
            self._flying.discard(key)
            answer = answer_of(result)
            self._answers[key] = answer
            while len(self._answers) > self._cache_size:
                self._answers.popitem(last=False)
            waiting = self._parked.pop(key, [])
        return [duplicate_result(r, key, answer) for r in waiting]


class GateKeeper:
    """An executor's one entry to the gates: ``route`` each prepared request, ``resolved`` each result."""

    def __init__(self, settings: GateSettings, deduper: Deduper | None = None) -> None:
        self.settings = settings
        self.deduper = deduper if settings.dedupe_audio else None

    def route(self, request: Request) -> Result | object | None:
        """None: send it to the engine. A Result: its row, no engine (silence, or a known duplicate).
        PARKED: a duplicate waiting for its original's result (``resolved`` returns its row)."""
        m = request.chunk.measures
        if m is not None and m.gate == SILENCE:
            return Result(chunk=request.chunk, prompt=request.prompt, gate=SILENCE)
        if self.deduper is not None:
            return self.deduper.claim(request)
        return None

    def resolved(self, result: Result) -> list[Result]:
        return self.deduper.resolved(result) if self.deduper is not None else []


# --- the columns ------------------------------------------------------------------------------------


def row_values(result: Result) -> dict[str, Any]:
    """The gates' columns of one row (null where nothing was measured: error rows, the Ray executor)."""
    m = result.chunk.measures
    return {
        "rms_dbfs": None if m is None else m.rms_dbfs,
        "peak_dbfs": None if m is None else m.peak_dbfs,
        "active_ratio": None if m is None else m.active_ratio,
        "speech_ratio": None if m is None else m.speech_ratio,
        "speech_segments": None if m is None else m.speech_segments,
        "audio_sha256": None if m is None else m.audio_sha256,
        "gate": result.gate,
        "duplicate_of": result.duplicate_of,
        "duplicate_of_chunk": result.duplicate_of_chunk,
    }
