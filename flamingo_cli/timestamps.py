"""Timestamps in generated text → typed segments ``[{start_s, end_s, text}]`` in absolute track time.

Pure: no I/O, no model. The sink calls ``segments`` for every caption row (parsing is cheap), so the
scene-breakdown and long-caption presets (and any prompt that asks for times) get a ``segments``
column readers see as ``list<struct<start_s f64, end_s f64, text string>>``.

What counts as a timestamp (each a *point* or a *range*):

* clock times: ``1:05``, ``01:05``, ``1:02:03`` (h:mm:ss), ``1:05.5`` (decimal seconds);
* seconds with a unit: ``12.5s``, ``12 s``, ``12 sec``, ``30 seconds``; a bare integer with a glued
  ``s`` (``80s``) is a decade, not a time, unless brackets or a range make it one (``[12s]``, ``0-12s``);
* ranges: ``A - B``, ``A – B``, ``A — B``, ``A to B``, ``A until B``, ``from A to B``, the unit may
  come once at the end (``12-20 s``); any of them in brackets: ``[00:30-01:05]``, ``(0:30 - 1:05)``,
  ``[12.5 s]``.

The rule: one segment per timestamp, in text order; its text is what follows it up to the next
timestamp (separators, bullets and list numbers trimmed), so ``0:00-0:30: intro`` lines give one
segment each. A point ends where the next segment starts, or at the chunk's end. Times in the text
are relative to the audio the model heard; ``base_s`` (the chunk's start in the source file: the item's
offset plus the chunk's start in the item) is added to both ends. Text without timestamps gives [].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CLOCK = r"(?:\d{1,2}:)?\d{1,3}:\d{2}(?:\.\d+)?"
_NUM = r"\d+(?:\.\d+)?"
_UNIT = r"(?:seconds?|secs?|s)\b"
_TIME = rf"(?:{_CLOCK}|{_NUM}\s?{_UNIT})"
_START = rf"(?:{_CLOCK}|{_NUM}(?:\s?{_UNIT})?)"
_SEP = r"(?:-|–|—|~|to|until|through|till)"

_PATTERN = re.compile(
    rf"""
    (?P<open>[\[(]\s*)?
    (?:
        (?:(?:from|between)\s+)?(?P<a>{_START})\s*{_SEP}\s*(?P<b>{_TIME}|{_NUM}(?=\s*[\])]))
      | (?P<p>{_TIME}|{_NUM}(?=\s*[\])]))
    )
    (?(open)\s*[\])])
    """,
    re.VERBOSE | re.IGNORECASE,
)
# Not inside a longer number, date or clock (2024-01-02 12:30:00 has no 12:30 of its own to find).
_BEFORE = re.compile(r"(?:[\d:.\w]|\d{4}-\d{2}-\d{2}[ T])\Z")
_AFTER = re.compile(r"^(?:\d|[:.]\d)")
_LEAD = re.compile(r"^[\s:;,.\-–—|)\]>*•]+")
_TRAIL = re.compile(r"(?:\s*(?:\d+[.)]|[-–—*•|]|\(|\[|\b(?:and then|then|at|from|around|by|until|after)))*\s*\Z", re.I)


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    text: str

    def as_dict(self) -> dict[str, float | str]:
        return {"start_s": self.start_s, "end_s": self.end_s, "text": self.text}


def to_seconds(token: str) -> float:
    """``1:02:03`` → 3723.0, ``1:05.5`` → 65.5, ``12.5 s`` → 12.5, ``30 seconds`` → 30.0."""
    token = token.strip()
    if ":" in token:
        total = 0.0
        for part in token.split(":"):
            total = total * 60 + float(part)
        return total
    return float(re.match(_NUM, token).group(0))  # type: ignore[union-attr]


def _glued_decade(token: str) -> bool:
    """``80s`` / ``1980s``: an integer with a glued ``s`` reads as a decade, not as seconds."""
    return re.fullmatch(r"\d+s", token.strip(), re.IGNORECASE) is not None


def find(text: str) -> list[tuple[float, float | None, int, int]]:
    """The timestamps of ``text`` in order: (start, end or None for a point, span start, span end)."""
    found: list[tuple[float, float | None, int, int]] = []
    for m in _PATTERN.finditer(text):
        if _BEFORE.search(text[: m.start()]) or _AFTER.search(text[m.end() :]):
            continue
        bracketed = m.group("open") is not None
        if m.group("p") is not None:
            token = m.group("p")
            if not bracketed and _glued_decade(token):
                continue
            found.append((to_seconds(token), None, m.start(), m.end()))
            continue
        a, b = to_seconds(m.group("a")), to_seconds(m.group("b"))
        if b < a:  # "10 - 5" is not a span of time
            continue
        found.append((a, b, m.start(), m.end()))
    return found


def _clean(text: str) -> str:
    text = _LEAD.sub("", text)
    return _TRAIL.sub("", text).strip()


def parse(text: str | None, base_s: float = 0.0, end_s: float | None = None) -> list[Segment]:
    """The typed segments of ``text``: times + ``base_s``; a point ends at the next start or ``end_s``
    (absolute; without it, at its own start)."""
    if not text:
        return []
    stamps = find(text)
    out: list[Segment] = []
    for i, (start, stop, _, span_end) in enumerate(stamps):
        nxt = stamps[i + 1] if i + 1 < len(stamps) else None
        body = text[span_end : nxt[2] if nxt else len(text)]
        a = base_s + start
        if stop is not None:
            b = base_s + stop
        elif nxt is not None and base_s + nxt[0] >= a:
            b = base_s + nxt[0]
        else:
            b = end_s if end_s is not None and end_s >= a else a
        out.append(Segment(a, b, _clean(body)))
    return out


def segments(text: str | None, base_s: float = 0.0, end_s: float | None = None) -> list[dict[str, float | str]]:
    """``parse`` as the column's Python value (a list of dicts; [] for text without timestamps)."""
    return [s.as_dict() for s in parse(text, base_s, end_s)]


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour): how prompts name times to a model."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
