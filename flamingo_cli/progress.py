"""Progress for people and for logs: a Rich live panel on a TTY, plain periodic lines off it."""

from __future__ import annotations

import time
from typing import Any

from rich.live import Live
from rich.table import Table

from flamingo_cli.env import Environment
from flamingo_cli.pipeline import Stats


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_fields(s: dict[str, Any]) -> dict[str, Any]:
    elapsed = max(1e-9, time.monotonic() - s["started"])
    return {
        "items": s["items_seen"],
        "skipped": s["items_skipped"],
        "failed_items": s["items_failed"],
        "chunks_done": s["chunks_done"],
        "chunks_failed": s["chunks_failed"],
        "audio_hours": s["audio_s_done"] / 3600,
        "x_realtime": s["audio_s_done"] / elapsed,
        "windows_per_s": s["windows_done"] / elapsed,
        "elapsed_s": elapsed,
    }


class Progress:
    """Call ``tick()`` often (it rate-limits itself) and ``close()`` once."""

    def __init__(self, env: Environment, stats: Stats, model: str, quiet: bool = False, interval: float = 30.0):
        self.env, self.stats, self.model, self.quiet = env, stats, model, quiet
        self.interval = interval
        self._last = 0.0
        self._live: Live | None = None
        if not quiet and env.stderr_isatty:
            self._live = Live(self._table(), console=env.err, refresh_per_second=4, transient=False)
            self._live.start()

    def _eta(self, s: dict[str, Any]) -> str:
        done, queued = s["audio_s_done"], s["audio_s_queued"]
        if not s["sources_exhausted"] or done <= 0:
            return "…"
        rate = done / max(1e-9, time.monotonic() - s["started"])
        return _hms((queued - done) / rate) if rate > 0 else "…"

    def _table(self) -> Table:
        s = self.stats.snapshot()
        f = summary_fields(s)
        table = Table.grid(padding=(0, 2))
        table.add_row("model", self.model)
        total = "" if not s["sources_exhausted"] else f"/{s['chunks_queued']}"
        table.add_row("items", f"{s['items_seen']} seen, {s['items_skipped']} already done, {s['items_failed']} failed")
        table.add_row("chunks", f"{s['chunks_done']}{total} done, {s['chunks_failed']} failed")
        table.add_row("audio", f"{s['audio_s_done'] / 3600:.2f} / {s['audio_s_queued'] / 3600:.2f} h")
        table.add_row("speed", f"{f['x_realtime']:.1f}× real time, {f['windows_per_s']:.2f} windows/s")
        table.add_row("elapsed / ETA", f"{_hms(f['elapsed_s'])} / {self._eta(s)}")
        return table

    def line(self) -> str:
        s = self.stats.snapshot()
        f = summary_fields(s)
        return (
            f"[flamingo] items={s['items_seen']} skipped={s['items_skipped']} failed={s['items_failed']} "
            f"chunks={s['chunks_done']}/{s['chunks_queued']} chunk_errors={s['chunks_failed']} "
            f"audio_h={s['audio_s_done'] / 3600:.3f} x_rt={f['x_realtime']:.1f} "
            f"win_s={f['windows_per_s']:.2f} elapsed={_hms(f['elapsed_s'])} eta={self._eta(s)}"
        )

    def tick(self) -> None:
        now = time.monotonic()
        if self._live is not None:
            if now - self._last >= 0.25:
                self._live.update(self._table())
                self._last = now
        elif not self.quiet and now - self._last >= self.interval:
            if self._last:
                self.env.info(self.line())
            self._last = now

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None
