"""The report's plots as inline SVG, drawn here (no JavaScript, no chart library): histograms, bars, a
throughput line. Each plot is a ``Plot`` with a title, the SVG and a one-line text summary (the SVG's
accessible name, and what a reader without images gets)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

W, H = 460, 200
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 10, 34


@dataclass
class Plot:
    title: str
    svg: str
    summary: str


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.3g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.3g}k"
    return f"{x:.3g}"


def _svg(body: str, label: str, height: int = H) -> str:
    return (
        f'<svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img" aria-label="{escape(label)}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>{body}</svg>'
    )


def histogram(values: Any, title: str, unit: str, bins: int = 30) -> Plot | None:
    """Counts of ``values`` (a numpy array) in equal bins; None when there is nothing to draw."""
    import numpy as np

    values = values[np.isfinite(values)] if values.size else values
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = int(counts.max()) or 1
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    bw = pw / bins
    bars = []
    for i, c in enumerate(counts):
        h = ph * int(c) / top
        x, y = PAD_L + i * bw, PAD_T + ph - h
        tip = f"{_num(edges[i])}–{_num(edges[i + 1])} {unit}: {int(c):,}"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" height="{h:.1f}" class="bar">'
            f"<title>{tip}</title></rect>"
        )
    axes = (
        f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{W - PAD_R}" y2="{PAD_T + ph}" class="axis"/>'
        f'<text x="{PAD_L}" y="{H - 16}" class="tick">{_num(lo)}</text>'
        f'<text x="{W - PAD_R}" y="{H - 16}" class="tick" text-anchor="end">{_num(hi)}</text>'
        f'<text x="{PAD_L + pw / 2}" y="{H - 3}" class="tick" text-anchor="middle">{escape(unit)}</text>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + 9}" class="tick" text-anchor="end">{_num(top)}</text>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + ph}" class="tick" text-anchor="end">0</text>'
    )
    median = float(np.median(values))
    summary = f"{values.size:,} values from {_num(lo)} to {_num(hi)} {unit}, median {_num(median)}"
    return Plot(title, _svg("".join(bars) + axes, f"{title}: {summary}"), summary)


def bars(pairs: list[tuple[str, int]], title: str, most: int = 12) -> Plot | None:
    """Horizontal bars, largest first; the rest folded into one bar."""
    if not pairs:
        return None
    pairs = sorted(pairs, key=lambda p: -p[1])
    if len(pairs) > most:
        rest = sum(n for _, n in pairs[most - 1 :])
        pairs = [*pairs[: most - 1], (f"({len(pairs) - most + 1} others)", rest)]
    row = 20
    height = PAD_T + row * len(pairs) + 6
    top = max(n for _, n in pairs) or 1
    label_w = 190
    pw = W - label_w - 60
    body = []
    for i, (name, n) in enumerate(pairs):
        y = PAD_T + i * row
        short = name if len(name) <= 27 else name[:26] + "…"
        body.append(
            f'<text x="{label_w - 6}" y="{y + 14}" class="tick" text-anchor="end">{escape(short)}'
            f"<title>{escape(name)}</title></text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{max(pw * n / top, 1):.1f}" height="{row - 6}" class="bar">'
            f"<title>{escape(name)}: {n:,}</title></rect>"
            f'<text x="{label_w + pw * n / top + 4:.1f}" y="{y + 14}" class="tick">{n:,}</text>'
        )
    summary = "; ".join(f"{name} {n:,}" for name, n in pairs)
    return Plot(title, _svg("".join(body), f"{title}: {summary}", height), summary)


def throughput(created: dict[str, list[Any]], title: str = "throughput over the run") -> Plot | None:
    """Rows written per minute (from ``created_at``), one line per run."""
    import numpy as np

    series = {k: np.concatenate(v) for k, v in created.items() if v and sum(a.size for a in v)}
    if not series:
        return None
    t0 = min(int(a.min()) for a in series.values())
    t1 = max(int(a.max()) for a in series.values())
    span_min = max((t1 - t0) / 60e6, 1e-9)
    if span_min < 2:  # a run shorter than two minutes: per second
        step, unit = 1e6, "rows per second"
    else:
        step, unit = 60e6, "rows per minute"
    nb = max(int((t1 - t0) // step) + 1, 2)
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    lines, top, peak = [], 1, 0
    counts = {k: np.bincount(((a - t0) // step).astype(np.int64), minlength=nb) for k, a in series.items()}
    top = max(int(c.max()) for c in counts.values()) or 1
    for i, (_key, c) in enumerate(counts.items()):
        pts = " ".join(f"{PAD_L + pw * j / (nb - 1):.1f},{PAD_T + ph - ph * int(v) / top:.1f}" for j, v in enumerate(c))
        lines.append(f'<polyline points="{pts}" class="line s{i % 4}" fill="none"/>')
        peak = max(peak, int(c.max()))
    minutes = (t1 - t0) / 60e6
    axes = (
        f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{W - PAD_R}" y2="{PAD_T + ph}" class="axis"/>'
        f'<text x="{PAD_L}" y="{H - 16}" class="tick">0</text>'
        f'<text x="{W - PAD_R}" y="{H - 16}" class="tick" text-anchor="end">{_num(minutes)} min</text>'
        f'<text x="{PAD_L + pw / 2}" y="{H - 3}" class="tick" text-anchor="middle">'
        f"{unit}, by when rows were written</text>"
        f'<text x="{PAD_L - 4}" y="{PAD_T + 9}" class="tick" text-anchor="end">{_num(top)}</text>'
    )
    total = sum(int(c.sum()) for c in counts.values())
    summary = f"{total:,} rows over {_num(minutes)} min in {len(series)} run(s), peak {peak:,} {unit}"
    return Plot(title, _svg("".join(lines) + axes, f"{title}: {summary}"), summary)


def plots(doc: dict[str, Any], stats: Any) -> list[Plot]:
    """The report's plots, those with something to draw, from inspect's summary and the gathered stats."""
    import numpy as np

    def cat(parts: list[Any]) -> Any:
        return np.concatenate(parts) if parts else np.array([], dtype=np.float64)

    found = [
        histogram(cat(stats.item_seconds), "audio length per item", "seconds"),
        histogram(cat(stats.chunk_seconds), "chunk length", "seconds"),
        histogram(cat(stats.output_tokens), "generated tokens per chunk", "tokens"),
        histogram(cat(stats.prompt_tokens), "prompt tokens per chunk", "tokens"),
        bars([(g["reason"], g["count"]) for g in doc.get("errors_by_reason") or []], "errors by reason"),
        bars(list(stats.flags.items()), "flags by reason"),
        bars(list(stats.extensions.items()), "files by extension"),
        throughput(stats.created),
    ]
    return [p for p in found if p is not None]
