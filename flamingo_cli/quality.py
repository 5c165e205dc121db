"""How much to trust one caption: text measures and the flag rules (issue 25b). Pure: no vLLM, no I/O.

Every row that did not fail gets ``flags``, a list of reasons to look twice (empty when nothing is
wrong; null on error rows). The reasons and their anchors:

``repetition``
    a degenerate loop. Two detectors, either one flags: (1) a *tandem repeat*, the same run of words
    back to back (``key key key key key``, a sentence looping) with at least ``MIN_REPEATS`` copies for
    its length (5 for one word, 4 for two, 3 for up to 9 words, 2 for a passage of 10+ words); (2)
    Whisper's compression test: a stretch of 512 bytes (about Whisper's 30-s segment of text; the whole
    caption when shorter) compresses above ``compression_ratio`` (Whisper: 2.4). A
    JSON caption (a schema run) is judged by its parts, its keys and lists of objects repeating by
    design: each string value as prose, and each list for the same item 5 times back to back.
    Honest repetition ("drums, drums and more drums", a list of instruments, "verse, chorus, verse,
    chorus") is none of these.
``empty``
    the caption is empty or whitespace.
``truncated``
    generation hit ``--max-tokens`` (``finish_reason == "length"``).
``low_confidence``
    the mean log-probability of the generated tokens (``avg_logprob``) is below ``min_logprob``
    (Whisper: -1.0). Skipped when the run has no log-probabilities (``--no-logprobs``, Ray).
``silence_hallucination``
    a caption that describes content on near-silent audio (``rms_dbfs`` at or below
    ``silence_rms_dbfs``, or ``active_ratio`` below ``silence_active_ratio``) without saying it is
    silent or quiet. Only where the chunk has audio measures (``flags_for(..., measures=...)``).

Thresholds live in ``QualityRules`` (tunable: ``--flag-compression-ratio``, ``--flag-min-logprob``).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

REPETITION = "repetition"
EMPTY = "empty"
TRUNCATED = "truncated"
LOW_CONFIDENCE = "low_confidence"
SILENCE_HALLUCINATION = "silence_hallucination"
FLAGS = (REPETITION, EMPTY, TRUNCATED, LOW_CONFIDENCE, SILENCE_HALLUCINATION)

# Whisper's anchors (openai/whisper transcribe.py: compression_ratio_threshold, logprob_threshold).
WHISPER_COMPRESSION_RATIO = 2.4
WHISPER_MIN_LOGPROB = -1.0

# Tandem repeats: the copies a run of n words needs back to back to be a loop, by n (the last entry for
# every longer run). One word five times ("key key key key key"), two words four times, a phrase of up
# to 9 words three times, a passage of 10+ words twice.
MIN_REPEATS = (5, 4, 3, 3, 3, 3, 3, 3, 3, 2)
LONGEST_PERIOD = 200  # words: a looping paragraph longer than this is left to the compression test
# The compression test reads stretches of this many bytes: about the text of Whisper's 30-s segment
# (75 words), the scale its 2.4 is set for. A whole long description compresses better than that
# without looping (2000 honest words: ~2.6), so it is measured stretch by stretch.
WINDOW_BYTES = 512

# Words: runs of letters/digits; CJK, kana and Thai characters one by one (no spaces between words).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)
# A caption that says the audio is (near) silent is not a hallucination on silence.
_SAYS_SILENT = re.compile(
    r"silen|quiet|no (?:audible |discernible )?(?:sound|audio|music|speech)|nothing (?:is )?(?:audible|heard)|"
    r"inaudible|barely audible|faint|near[- ]silen|empty|static|hiss|room tone|background noise only",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class QualityRules:
    """The flag thresholds; the defaults are Whisper's anchors (see the module docstring)."""

    compression_ratio: float = WHISPER_COMPRESSION_RATIO
    min_logprob: float = WHISPER_MIN_LOGPROB
    silence_rms_dbfs: float = -60.0
    silence_active_ratio: float = 0.01

    def identity(self) -> dict[str, Any]:
        return {"compression_ratio": self.compression_ratio, "min_logprob": self.min_logprob}


DEFAULT_RULES = QualityRules()


# --- text measures -------------------------------------------------------------------------------


def compression_ratio(text: str | None) -> float | None:
    """Whisper's measure: UTF-8 bytes / zlib-compressed bytes (None for no text, 0.0 for "")."""
    if text is None:
        return None
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def words(text: str) -> list[str]:
    """Lower-case words (CJK characters one by one); punctuation and spacing left out."""
    return _WORD.findall(text.casefold())


def parse_json(text: str) -> Any:
    """A caption that is a JSON object or array, parsed; None for anything else (prose, cut-off JSON)."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _lists(value: Any) -> Iterable[list[Any]]:
    if isinstance(value, list):
        yield value
        for v in value:
            yield from _lists(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _lists(v)


def tandem_repeat(tokens: Sequence[str]) -> tuple[int, float] | None:
    """The shortest loop in ``tokens``: (period in words, copies) of a run of words repeated back to
    back at least ``MIN_REPEATS`` times for its length; None when there is none."""
    n = len(tokens)
    if n < 4:
        return None
    ids: dict[str, int] = {}
    a = np.fromiter((ids.setdefault(t, len(ids)) for t in tokens), dtype=np.int64, count=n)
    for period in range(1, min(LONGEST_PERIOD, n // 2) + 1):
        need = MIN_REPEATS[min(period, len(MIN_REPEATS)) - 1]
        if period * need > n:
            break
        same = a[:-period] == a[period:]  # same[i]: the word at i comes back `period` words later
        run = _longest_true_run(same)
        copies = (run + period) / period
        if copies >= need:
            return period, copies
    return None


def _longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max())


def window_compression_ratio(text: str, size: int = WINDOW_BYTES) -> float:
    """The highest compression ratio of the text's stretches of ``size`` bytes (half-overlapping; the
    whole text when shorter): Whisper's measure at Whisper's scale, whatever the caption's length."""
    data = text.encode("utf-8")
    if len(data) <= size:
        return compression_ratio(text) or 0.0
    starts = [*range(0, len(data) - size, size // 2), len(data) - size]
    return max(size / len(zlib.compress(data[s : s + size])) for s in starts)


def loops(text: str, rules: QualityRules = DEFAULT_RULES) -> bool:
    """Prose that loops: a tandem repeat of words, or a stretch that compresses above the threshold."""
    if tandem_repeat(words(text)) is not None:
        return True
    return window_compression_ratio(text) > rules.compression_ratio


def is_repetition(text: str, rules: QualityRules = DEFAULT_RULES) -> bool:
    """A degenerate loop. A JSON caption (a schema run) is judged by its parts, since its keys and its
    lists of objects repeat by design: each string value as prose, and each list for the same item
    back to back (``["guitar", "guitar", "guitar", "guitar", "guitar"]``); other text as prose."""
    value = parse_json(text)
    if value is None:
        return loops(text, rules)
    if any(loops(s, rules) for s in _strings(value)):
        return True
    return any(tandem_repeat([json.dumps(v, sort_keys=True) for v in lst]) is not None for lst in _lists(value))


def mean_logprob(
    logprobs: Sequence[float] | None, token_ids: Sequence[int] | None = None, after: Sequence[int] = ()
) -> float | None:
    """The mean of the sampled tokens' log-probabilities (None without any). ``after``: a think model's
    closing-tag token ids; only the tokens after its last occurrence (the answer) count, when it is there."""
    if not logprobs:
        return None
    values = list(logprobs)
    if after and token_ids is not None and len(token_ids) == len(values):
        k = len(after)
        ids = list(token_ids)
        for start in range(len(ids) - k, -1, -1):
            if ids[start : start + k] == list(after):
                values = values[start + k :]
                break
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return float(sum(finite) / len(finite))


# --- flags ---------------------------------------------------------------------------------------


def _measure(measures: Any, name: str) -> float | None:
    value = measures.get(name) if isinstance(measures, Mapping) else getattr(measures, name, None)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def near_silent(measures: Any, rules: QualityRules = DEFAULT_RULES) -> bool:
    """The chunk's audio measures (``rms_dbfs``, ``active_ratio``; a mapping or an object) say silence."""
    if measures is None:
        return False
    rms = _measure(measures, "rms_dbfs")
    active = _measure(measures, "active_ratio")
    return (rms is not None and rms <= rules.silence_rms_dbfs) or (
        active is not None and active < rules.silence_active_ratio
    )


def caption_flags(
    caption: str | None,
    finish_reason: str | None = None,
    avg_logprob: float | None = None,
    measures: Any = None,
    rules: QualityRules = DEFAULT_RULES,
) -> list[str]:
    """The flags of one caption, in ``FLAGS`` order."""
    text = caption or ""
    found: set[str] = set()
    if not text.strip():
        found.add(EMPTY)
    elif is_repetition(text, rules):
        found.add(REPETITION)
    if finish_reason == "length":
        found.add(TRUNCATED)
    if avg_logprob is not None and avg_logprob < rules.min_logprob:
        found.add(LOW_CONFIDENCE)
    if text.strip() and near_silent(measures, rules) and not _SAYS_SILENT.search(text):
        found.add(SILENCE_HALLUCINATION)
    return [f for f in FLAGS if f in found]


def flags_for(result: Any, measures: Any = None, rules: QualityRules = DEFAULT_RULES) -> list[str] | None:
    """The flags of a ``records.Result``: None for an error row (its chunk or the engine failed), else
    ``caption_flags`` of its caption. ``measures``: the chunk's audio measures, where it has them
    (``rms_dbfs``, ``peak_dbfs``, ``active_ratio``); without, ``silence_hallucination`` is not checked."""
    if result.error is not None or result.chunk.error is not None:
        return None
    return caption_flags(result.caption, result.finish_reason, result.avg_logprob, measures, rules)


def measures_of(chunk: Any) -> Any:
    """The audio measures of a chunk, if the audio gates put any on it (else None)."""
    return getattr(chunk, "measures", None)


def parse_flags(value: str | Sequence[str] | None, option: str) -> frozenset[str] | None:
    """A comma-separated flag set (``repetition,empty``); ValueError naming ``option`` for an unknown one."""
    if value is None:
        return None
    names = [v.strip() for part in ([value] if isinstance(value, str) else value) for v in str(part).split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FLAGS]
    if unknown:
        raise ValueError(f"{option} {unknown[0]!r}: expected flags among {', '.join(FLAGS)}")
    return frozenset(names)
