"""Track rows (issue 26): one caption of a whole item cut into several chunks, made from its chunks'.

An item cut into more than one chunk gets, once all its chunk rows are written, a text-only request
through the same engine: the task's ``track_prompt`` after the chunks' captions with their times in the
item (``[8:30-17:00] …``). Its row has ``level = "track"`` and ``chunk_index = -1`` (``TRACK_INDEX``),
so (id, chunk_index) stays unique and the resume index and the sink's exactly-once filter treat it
like any key. ``num_chunks`` is the item's chunk count; ``start_s`` 0 and ``end_s`` the item's length.

Chunks that failed: the track row is made from the chunks with a caption, and the prompt names the
parts that have none; an item whose chunks all failed gets a track error row ("no chunk has a caption").

Resume: a crash after the last chunk row and before the track row leaves every chunk written and no
track row; the planner then asks for the track row only (``ItemDecision.track_only``), whose prompt is
built from the chunk rows read back from the output (``read_chunk_rows``): nothing is decoded again.
An item finished partly on disk gets its done chunks' captions the same way.

``Tracks`` is the small stage the local executor keeps: the producer announces each item (``expect``)
before its requests go out, the result loop hands it every result (``result``), and the producer puts
the feed's END only once every announced track request is out (``wait``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import TRACK_INDEX, AudioItem, Chunk, Request, Result
from flamingo_cli.timestamps import clock

NO_CAPTION = "no chunk of this item has a caption"
# Characters of chunk captions a track prompt may carry when the engine's context is unknown.
DEFAULT_BUDGET_CHARS = 200_000


@dataclass(slots=True)
class Part:
    """One chunk of an item as the track prompt names it."""

    index: int
    start_s: float
    end_s: float
    caption: str | None  # None: the chunk has no caption (its row is an error)


SILENT_PART = "(silence)"


def _part_caption(caption: str | None, error: str | None, gate: str | None) -> str | None:
    """What the track prompt says of one chunk: its caption; ``SILENT_PART`` for the silence gate's row
    (a quiet part, not a failed one); None for an error."""
    if error:
        return None
    if caption is None and gate == "silence":
        return SILENT_PART
    return caption


def track_text(instruction: str, parts: list[Part], duration_s: float, budget_chars: int = DEFAULT_BUDGET_CHARS) -> str:
    """The user message of a track request: the parts' captions with their times, then the instruction.
    Captions are cut to share ``budget_chars`` evenly when together they are longer."""
    parts = sorted(parts, key=lambda p: p.index)
    good = [p for p in parts if p.caption]
    share = max(200, budget_chars // max(1, len(good)))
    lines = [f"Descriptions of the {len(parts)} consecutive parts of one {clock(duration_s)} recording:", ""]
    for p in parts:
        when = f"[{clock(p.start_s)}-{clock(p.end_s)}]"
        if not p.caption:
            lines.append(f"{when} (no description: this part failed)")
            continue
        text = p.caption.strip()
        lines.append(f"{when} {text[:share].rstrip() + ' …' if len(text) > share else text}")
    return "\n".join([*lines, "", instruction])


def track_chunk(item: AudioItem, num_chunks: int, duration_s: float) -> Chunk:
    """The chunk a track row stands on: the whole item, no samples (a text-only request)."""
    return Chunk(
        item=item,
        index=TRACK_INDEX,
        num_chunks=num_chunks,
        start_s=0.0,
        end_s=duration_s,
        samples=None,
        duration_s=duration_s,
    )


def read_chunk_rows(out: str | Path, run_key: str, item_id: str) -> list[Part]:
    """The current chunk rows of one item in a run (its latest source_version), as Parts."""
    import pyarrow.dataset as ds

    from flamingo_cli.output.layout import current_rows, run_dataset

    dataset = run_dataset(out, run_key)
    if dataset is None:
        return []
    columns = ["id", "chunk_index", "num_chunks", "start_s", "end_s", "caption", "error", "gate"]
    columns += ["created_at", "source_version"]  # current_rows' reading rule
    table = current_rows(dataset.to_table(columns=columns, filter=ds.field("id") == item_id))
    return [
        Part(
            r["chunk_index"], r["start_s"] or 0.0, r["end_s"] or 0.0, _part_caption(r["caption"], r["error"], r["gate"])
        )
        for r in table.to_pylist()
        if r["chunk_index"] is not None and r["chunk_index"] >= 0 and (r["num_chunks"] or 0) > 0
    ]


@dataclass(slots=True)
class _Item:
    item: AudioItem
    num_chunks: int
    duration_s: float
    pending: set[int]
    parts: list[Part]


class Tracks:
    """Collects each announced item's chunk captions and sends its track request when the last arrives.

    ``put`` hands a request to the engine's feed (it must not block: the result loop calls it);
    ``write`` writes a row the engine is not asked for (an all-failed item's track error row);
    ``read_done(item_id)`` gives the chunk rows already on disk (None: nothing is on disk, no resume).
    """

    def __init__(
        self,
        instruction: str,
        prompts: PromptBuilder,
        put: Callable[[Request], None],
        write: Callable[[Result], None],
        read_done: Callable[[str], list[Part]] | None = None,
        budget_chars: int = DEFAULT_BUDGET_CHARS,
    ) -> None:
        self.instruction, self.prompts, self.put, self.write = instruction, prompts, put, write
        self.read_done, self.budget_chars = read_done, budget_chars
        self._items: dict[str, _Item] = {}
        self._cond = threading.Condition()
        self.sent = 0

    @staticmethod
    def wants(num_chunks: int) -> bool:
        return num_chunks > 1

    def expect(
        self,
        item: AudioItem,
        num_chunks: int,
        duration_s: float,
        pending: Collection[int],
        failed: Collection[Chunk] = (),
        done_on_disk: bool = False,
    ) -> None:
        """Announce an item (before its requests go out): ``pending`` chunk indexes go to the engine,
        ``failed`` chunks got their error rows already; ``done_on_disk``: the rest is in the output."""
        parts = [Part(c.index, c.start_s, c.end_s, None) for c in failed]
        if done_on_disk and self.read_done is not None:
            known = {p.index for p in parts} | set(pending)
            parts += [p for p in self.read_done(str(item.id)) if p.index not in known]
            if parts and duration_s != duration_s:  # NaN: not decoded (track only): the rows' end
                duration_s = max(p.end_s for p in parts)
        entry = _Item(item, num_chunks, duration_s, set(pending), parts)
        with self._cond:
            self._items[str(item.id)] = entry
        if not entry.pending:
            self._finish(str(item.id))

    def result(self, result: Result) -> None:
        """A result the engine produced (written already): the chunk's caption, or its error."""
        chunk = result.chunk
        if chunk.index == TRACK_INDEX:
            return
        key = str(chunk.item.id)
        with self._cond:
            entry = self._items.get(key)
            if entry is None or chunk.index not in entry.pending:
                return
            entry.pending.discard(chunk.index)
            caption = _part_caption(result.caption, result.error, result.gate)
            entry.parts.append(Part(chunk.index, chunk.start_s, chunk.end_s, caption))
            if entry.pending:
                return
        self._finish(key)

    def abandon(self, result: Result) -> None:
        """A chunk that will not be written now (aborted by a stop): its item's track row is left to resume."""
        with self._cond:
            if self._items.pop(str(result.chunk.item.id), None) is not None:
                self._cond.notify_all()

    def _finish(self, key: str) -> None:
        with self._cond:
            entry = self._items.pop(key, None)
            self._cond.notify_all()
        if entry is None:
            return
        chunk = track_chunk(entry.item, entry.num_chunks, entry.duration_s)
        if entry.parts and all(p.caption == SILENT_PART for p in entry.parts):
            # A silent file: its track is silence too, with no request (like its chunks).
            self.write(Result(chunk=chunk, prompt=self.instruction, gate="silence"))
            return
        if not any(p.caption and p.caption != SILENT_PART for p in entry.parts):
            self.write(Result(chunk=chunk, prompt=self.instruction, error=NO_CAPTION))
            return
        content = track_text(self.instruction, entry.parts, entry.duration_s, self.budget_chars)
        self.sent += 1
        self.put(Request(chunk=chunk, prompt=self.instruction, text=self.prompts.text_only(content)))

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._items)

    def wait(self, stop: threading.Event | None = None) -> None:
        """Until every announced item's track request is out (or ``stop`` is set)."""
        with self._cond:
            while self._items and not (stop is not None and stop.is_set()):
                self._cond.wait(0.2)


def budget_chars(engine: Any, max_tokens: int) -> int:
    """Characters of chunk captions that fit the engine's context beside the reply (about 3 a token)."""
    length = getattr(getattr(engine, "config", None), "max_model_len", None)
    if not isinstance(length, int):
        return DEFAULT_BUDGET_CHARS
    return max(2_000, 3 * (length - max_tokens - 256))
