"""chunking: spans within the model's cap, covering the whole item, no audio dropped."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from flamingo_cli.chunking import MIN_CHUNK_SAMPLES, ChunkSpans, chunk_audio, chunk_spans
from flamingo_cli.models import AF3, MF, num_audio_tokens
from flamingo_cli.records import SAMPLE_RATE, AudioItem, DecodedAudio

SR = SAMPLE_RATE


def decoded_of(n: int, indexed: bool = False) -> DecodedAudio:
    # indexed: sample value == its index (int32: exact past float32's 2**24), so slices are checkable
    samples = np.arange(n, dtype=np.int32) if indexed else np.zeros(n, dtype=np.float32)
    return DecodedAudio(item=AudioItem(id="x", path="/x.wav"), samples=samples)


def sample_spans(chunks) -> list[tuple[int, int]]:
    return [(round(c.start_s * SR), round(c.end_s * SR)) for c in chunks]


def assert_covers(spans: list[tuple[int, int]], n: int, cap: int, overlap: bool = False) -> None:
    assert spans[0][0] == 0
    assert spans[-1][1] == n
    for (s0, e0), (s1, e1) in itertools.pairwise(spans):
        assert s1 > s0 and e1 > e0  # strictly moving forward: no chunk inside another
        if overlap:
            assert s1 <= e0  # no gap
        else:
            assert s1 == e0  # exact shared boundary
    for s, e in spans:
        assert 0 < e - s <= cap or n == 0


def test_short_item_is_one_chunk() -> None:
    assert chunk_spans(42.5, 600).spans == [(0.0, 42.5)]
    chunks = chunk_audio(decoded_of(16000 * 42), 600)
    assert len(chunks) == 1
    c = chunks[0]
    assert (c.index, c.num_chunks, c.start_s, c.end_s, c.duration_s, c.error) == (0, 1, 0.0, 42.0, 42.0, None)
    assert c.samples is not None and len(c.samples) == 16000 * 42


def test_worked_example_1500s_af3() -> None:
    assert chunk_spans(1500, AF3.max_audio_s).spans == [(0.0, 510.0), (510.0, 1020.0), (1020.0, 1500.0)]


def test_long_items_are_balanced_and_window_aligned() -> None:
    # 3 hours on MF: ceil(10800/1200) = 9 chunks of exactly 1200 s.
    spans = chunk_spans(10800, MF.max_audio_s).spans
    assert spans == [(i * 1200.0, (i + 1) * 1200.0) for i in range(9)]
    # 1201 s on MF: 2 chunks, 630 + 571.
    assert chunk_spans(1201, MF.max_audio_s).spans == [(0.0, 630.0), (630.0, 1201.0)]
    # 601 s on AF3: 330 + 271.
    assert chunk_spans(601, AF3.max_audio_s).spans == [(0.0, 330.0), (330.0, 601.0)]


@pytest.mark.parametrize(
    ("duration", "cap", "expected_n"),
    [
        (599.99, 600, 1),
        (600.0, 600, 1),
        (600.01, 600, 2),
        (1199.0, 1200, 1),
        (1200.0, 1200, 1),
        (1201.0, 1200, 2),
    ],
)
def test_cap_boundaries(duration: float, cap: int, expected_n: int) -> None:
    plan = chunk_spans(duration, cap)
    assert plan.num_chunks == expected_n
    n = round(duration * SR)
    chunks = chunk_audio(decoded_of(n), cap)
    assert len(chunks) == expected_n
    assert sample_spans(chunks) == [(round(s * SR), round(e * SR)) for s, e in plan.spans]
    assert_covers(sample_spans(chunks), n, cap * SR)
    assert all(c.error is None for c in chunks)


@pytest.mark.parametrize("cap", [AF3.max_audio_s, MF.max_audio_s])
def test_sample_exact_cap(cap: int) -> None:
    at_cap = chunk_audio(decoded_of(cap * SR), cap)
    assert len(at_cap) == 1 and len(at_cap[0].samples) == cap * SR

    over = chunk_audio(decoded_of(cap * SR + 1), cap)
    assert len(over) == 2
    assert all(len(c.samples) <= cap * SR for c in over)
    assert sum(len(c.samples) for c in over) == cap * SR + 1
    assert all(c.error is None for c in over)


def test_chunk_samples_are_views_with_exact_boundaries() -> None:
    d = decoded_of(1500 * SR, indexed=True)
    chunks = chunk_audio(d, 600)
    for c in chunks:
        assert np.shares_memory(c.samples, d.samples)
        assert c.samples[0] == round(c.start_s * SR)
        assert c.samples[-1] == round(c.end_s * SR) - 1
        assert c.num_chunks == 3
        assert c.duration_s == 1500.0
        assert c.item is d.item
    assert [c.index for c in chunks] == [0, 1, 2]
    joined = np.concatenate([c.samples for c in chunks])
    np.testing.assert_array_equal(joined, d.samples)


def test_invariants_over_many_durations_auto() -> None:
    rng = random.Random(1234)
    durations = [rng.uniform(0.02, 4 * 3600) for _ in range(400)]
    durations += [k * 600 + d for k in range(1, 25) for d in (-1 / SR, 0, 1 / SR, 10 / SR, 0.5)]
    for cap in (AF3.max_audio_s, MF.max_audio_s):
        for duration in durations:
            n = round(duration * SR)
            spans = [(round(s * SR), round(e * SR)) for s, e in chunk_spans(duration, cap).spans]
            assert_covers(spans, n, cap * SR)
            assert len(spans) == -(-n // (cap * SR))  # never more chunks than needed
            # every chunk gives sound tokens: a tiny tail never survives alone
            assert all(num_audio_tokens(e - s) > 0 for s, e in spans)


def test_invariants_over_many_durations_fixed_and_overlap() -> None:
    rng = random.Random(99)
    for _ in range(400):
        cap = rng.choice([AF3.max_audio_s, MF.max_audio_s])
        chunk_s = rng.choice([10.0, 30.0, 45.5, 300.0, float(cap), rng.uniform(1, cap)])
        overlap_s = rng.choice([0.0, 0.0, 1.0, chunk_s / 2, rng.uniform(0, chunk_s * 0.9)])
        duration = rng.uniform(0.05, 3 * 3600)
        n = round(duration * SR)
        spans = [(round(s * SR), round(e * SR)) for s, e in chunk_spans(duration, cap, chunk_s, overlap_s).spans]
        assert_covers(spans, n, cap * SR, overlap=overlap_s > 0)
        size = round(chunk_s * SR)
        assert all(e - s <= size + MIN_CHUNK_SAMPLES for s, e in spans)
        assert all(num_audio_tokens(e - s) > 0 for s, e in spans)


def test_fixed_chunks() -> None:
    assert chunk_spans(100, 600, chunk_s=30).spans == [(0.0, 30.0), (30.0, 60.0), (60.0, 90.0), (90.0, 100.0)]
    assert chunk_spans(90, 600, chunk_s=30).spans == [(0.0, 30.0), (30.0, 60.0), (60.0, 90.0)]
    assert chunk_spans(20, 600, chunk_s=30).spans == [(0.0, 20.0)]


def test_overlap() -> None:
    spans = chunk_spans(100, 600, chunk_s=30, overlap_s=10).spans
    # step 20: 0-30, 20-50, 40-70, 60-90, 80-100; no chunk at 100-100 or wholly inside 80-100
    assert spans == [(0.0, 30.0), (20.0, 50.0), (40.0, 70.0), (60.0, 90.0), (80.0, 100.0)]
    # 90 s: the chunk at 60-90 reaches the end, so no trailing 80-90 chunk inside it.
    assert chunk_spans(90, 600, chunk_s=30, overlap_s=10).spans[-1] == (60.0, 90.0)
    assert len(chunk_spans(90, 600, chunk_s=30, overlap_s=10).spans) == 4


def test_overlap_chunks_share_samples() -> None:
    d = decoded_of(100 * SR, indexed=True)
    chunks = chunk_audio(d, 600, chunk_s=30, overlap_s=10)
    np.testing.assert_array_equal(chunks[0].samples[-10 * SR :], chunks[1].samples[: 10 * SR])
    assert chunks[-1].end_s == 100.0


@pytest.mark.parametrize(
    ("chunk_s", "overlap_s"),
    [(0, 0), (-5, 0), (601, 0), (30, 30), (30, 40), (30, -1), (0.001, 0)],
)
def test_invalid_fixed_parameters(chunk_s: float, overlap_s: float) -> None:
    with pytest.raises(ValueError):
        chunk_spans(100, 600, chunk_s=chunk_s, overlap_s=overlap_s)
    with pytest.raises(ValueError):
        chunk_audio(decoded_of(100 * SR), 600, chunk_s=chunk_s, overlap_s=overlap_s)


def test_invalid_other_parameters() -> None:
    with pytest.raises(ValueError, match="overlap_s needs chunk_s"):
        chunk_spans(100, 600, overlap_s=5)
    with pytest.raises(ValueError):
        chunk_spans(100, 0)
    with pytest.raises(ValueError):
        chunk_spans(-1, 600)


def test_chunk_at_cap_is_allowed() -> None:
    spans = chunk_spans(1300, 600, chunk_s=600).spans
    assert spans == [(0.0, 600.0), (600.0, 1200.0), (1200.0, 1300.0)]


def test_tiny_tail_merges_into_previous() -> None:
    n = 90 * SR + 100  # 100-sample tail after three 30 s chunks: gives no token
    chunks = chunk_audio(decoded_of(n), 600, chunk_s=30)
    assert sample_spans(chunks) == [(0, 30 * SR), (30 * SR, 60 * SR), (60 * SR, n)]
    assert all(c.error is None for c in chunks)
    assert all(c.num_chunks == 3 for c in chunks)


def test_tiny_tail_that_cannot_merge_borrows_from_previous() -> None:
    # Fixed chunks at the cap: merging would exceed 600 s, so the boundary moves back instead.
    n = 1200 * SR + 50
    chunks = chunk_audio(decoded_of(n), 600, chunk_s=600)
    spans = sample_spans(chunks)
    assert spans == [(0, 600 * SR), (600 * SR, n - MIN_CHUNK_SAMPLES), (n - MIN_CHUNK_SAMPLES, n)]
    assert all(c.error is None for c in chunks)
    assert all(len(c.samples) <= 600 * SR for c in chunks)
    # Auto mode, 21 chunks where window alignment leaves a 10-sample tail.
    n = 20 * 600 * SR + 10
    spans = [(round(s * SR), round(e * SR)) for s, e in chunk_spans(n / SR, 600).spans]
    assert len(spans) == 21
    assert spans[-1] == (n - MIN_CHUNK_SAMPLES, n)
    assert_covers(spans, n, 600 * SR)


def test_tail_just_long_enough_is_kept() -> None:
    n = 60 * SR + MIN_CHUNK_SAMPLES
    chunks = chunk_audio(decoded_of(n), 600, chunk_s=30)
    assert len(chunks) == 3
    assert len(chunks[-1].samples) == MIN_CHUNK_SAMPLES
    assert num_audio_tokens(MIN_CHUNK_SAMPLES) == 1
    assert chunks[-1].error is None


def test_too_short_item_is_one_error_chunk() -> None:
    assert MIN_CHUNK_SAMPLES == 321
    chunks = chunk_audio(decoded_of(100), 600)
    assert len(chunks) == 1
    c = chunks[0]
    assert c.error == ("audio too short: 100 samples (6.25 ms) gives no sound token; at least 321 samples are needed")
    assert c.num_chunks == 1 and c.start_s == 0.0 and c.end_s == 100 / SR
    assert c.samples is not None and len(c.samples) == 100
    assert chunk_audio(decoded_of(320), 600)[0].error is not None
    assert chunk_audio(decoded_of(321), 600)[0].error is None
    # Same with fixed chunks.
    assert chunk_audio(decoded_of(100), 600, chunk_s=30)[0].error is not None


def test_plan_matches_chunk_audio() -> None:
    rng = random.Random(7)
    for _ in range(50):
        duration = round(rng.uniform(0.1, 5000), 3)
        n = round(duration * SR)
        for kwargs in ({}, {"chunk_s": 60.0}, {"chunk_s": 120.0, "overlap_s": 15.0}):
            plan = chunk_spans(duration, 600, **kwargs)
            chunks = chunk_audio(decoded_of(n), 600, **kwargs)
            assert isinstance(plan, ChunkSpans)
            assert plan.spans == [(c.start_s, c.end_s) for c in chunks]
