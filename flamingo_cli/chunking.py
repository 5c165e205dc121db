"""Split an item's audio into chunks the model sees whole: within its cap, no audio dropped.

The HF processor silently truncates audio beyond the model's cap (AF3 600 s, MF 1200 s), so longer
items are split. Boundaries are planned once on integer 16 kHz sample indices, so adjacent chunks
share exact boundaries and every chunk's sample count is provably <= cap * 16000. The same planner
serves chunk_audio() (real samples) and chunk_spans() (durations only, for --dry-run), so the two
always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flamingo_cli.models import WINDOW_SAMPLES, num_audio_tokens
from flamingo_cli.records import SAMPLE_RATE, Chunk, DecodedAudio

# Fewest samples that give at least one sound token (321 with Whisper's 160-sample hop); derived
# from models.num_audio_tokens so it follows any change there.
MIN_CHUNK_SAMPLES = next(n for n in range(1, WINDOW_SAMPLES) if num_audio_tokens(n) > 0)


@dataclass(frozen=True)
class ChunkSpans:
    """Chunk spans in seconds, relative to the item: pure arithmetic, no samples."""

    spans: list[tuple[float, float]]

    @property
    def num_chunks(self) -> int:
        return len(self.spans)


def too_short_reason(n_samples: int) -> str:
    """The Chunk.error for audio that gives no sound token."""
    ms = n_samples * 1000 / SAMPLE_RATE
    return (
        f"audio too short: {n_samples} samples ({ms:g} ms) gives no sound token; "
        f"at least {MIN_CHUNK_SAMPLES} samples are needed"
    )


def _cap_samples(max_chunk_s: float) -> int:
    if not math.isfinite(max_chunk_s) or max_chunk_s <= 0:
        raise ValueError(f"max_chunk_s must be > 0, got {max_chunk_s}")
    # Floor (with float slack): a chunk may never exceed the cap, even by one sample.
    cap = math.floor(max_chunk_s * SAMPLE_RATE + 1e-6)
    if cap < MIN_CHUNK_SAMPLES:
        raise ValueError(f"max_chunk_s {max_chunk_s} is too short to give any sound token")
    return cap


def _sample_spans(n: int, max_chunk_s: float, chunk_s: float | None, overlap_s: float) -> list[tuple[int, int]]:
    """(start, end) sample indices per chunk; covers [0, n] with no gap, each <= the cap."""
    cap = _cap_samples(max_chunk_s)
    if chunk_s is None:
        if overlap_s:
            raise ValueError("overlap_s needs chunk_s (an overlap only applies to fixed-length chunks)")
        if n <= cap:
            return [(0, n)]
        # Balanced chunks aligned to the 30 s encoder window: 1500 s, cap 600 -> 510, 510, 480.
        k = -(-n // cap)
        length = min(-(-n // (k * WINDOW_SAMPLES)) * WINDOW_SAMPLES, cap)
        spans = [(s, min(s + length, n)) for s in range(0, n, length)]
    else:
        if not math.isfinite(chunk_s) or not 0 < chunk_s <= max_chunk_s:
            raise ValueError(f"chunk_s must be in (0, {max_chunk_s}] (the model's cap), got {chunk_s}")
        if not math.isfinite(overlap_s) or not 0 <= overlap_s < chunk_s:
            raise ValueError(f"overlap_s must be in [0, chunk_s={chunk_s}), got {overlap_s}")
        size = min(round(chunk_s * SAMPLE_RATE), cap)
        if size < MIN_CHUNK_SAMPLES:
            raise ValueError(f"chunk_s {chunk_s} is too short to give any sound token")
        step = size - round(overlap_s * SAMPLE_RATE)
        if step <= 0:
            raise ValueError(f"chunk_s - overlap_s must be at least one sample, got {chunk_s} - {overlap_s}")
        spans = []
        start = 0
        while True:
            end = min(start + size, n)
            spans.append((start, end))
            if end >= n:  # the last chunk ends exactly at n; never add one inside it
                break
            start += step
    return _fix_tiny_tail(spans, n, cap)


def _fix_tiny_tail(spans: list[tuple[int, int]], n: int, cap: int) -> list[tuple[int, int]]:
    """A last chunk too short for one sound token joins the previous one, or borrows from it.

    Merge when the joined chunk stays within the cap; otherwise move the last chunk's start back to
    n - MIN_CHUNK_SAMPLES (the previous chunk ends there too unless chunks overlap), so no audio is
    lost and no chunk exceeds the cap.
    """
    if len(spans) < 2:
        return spans
    (ps, pe), (ls, le) = spans[-2], spans[-1]
    if le - ls >= MIN_CHUNK_SAMPLES:
        return spans
    if n - ps <= cap:
        return [*spans[:-2], (ps, n)]
    new_ls = n - MIN_CHUNK_SAMPLES
    new_pe = new_ls if pe == ls else pe
    return [*spans[:-2], (ps, new_pe), (new_ls, n)]


def chunk_spans(
    duration_s: float, max_chunk_s: float, chunk_s: float | None = None, overlap_s: float = 0.0
) -> ChunkSpans:
    """The spans chunk_audio() would cut for audio of duration_s seconds (at 16 kHz)."""
    if not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    n = round(duration_s * SAMPLE_RATE)
    spans = _sample_spans(n, max_chunk_s, chunk_s, overlap_s)
    return ChunkSpans(spans=[(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in spans])


def chunk_audio(
    decoded: DecodedAudio, max_chunk_s: float, chunk_s: float | None = None, overlap_s: float = 0.0
) -> list[Chunk]:
    """Cut decoded audio into chunks (views of decoded.samples); too-short chunks carry an error."""
    samples = decoded.samples
    n = int(samples.shape[0])
    spans = _sample_spans(n, max_chunk_s, chunk_s, overlap_s)
    total = n / SAMPLE_RATE
    return [
        Chunk(
            item=decoded.item,
            index=i,
            num_chunks=len(spans),
            start_s=s / SAMPLE_RATE,
            end_s=e / SAMPLE_RATE,
            samples=samples[s:e],
            duration_s=total,
            error=too_short_reason(e - s) if num_audio_tokens(e - s) == 0 else None,
        )
        for i, (s, e) in enumerate(spans)
    ]
