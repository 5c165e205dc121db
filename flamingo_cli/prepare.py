"""Prepare one item for the engine: decode it, cut it into chunks, render each chunk's request.

The one stage function every executor calls (``pipeline.py`` in its decode pool, ``ray_data.py`` in a
Ray task): an item in, and out either the reason it cannot be captioned (its one error row: a decode
error, chunk settings it cannot be cut by) or the requests of its chunks still to caption, chunks too
short for a sound token among them with their own error. With ``gates`` (a ``gates.GateSettings``) each
chunk is measured on the way (``Chunk.measures``: level, audio hash, speech) and silent ones are marked
(``measures.gate``): the executor writes their rows without an engine request. Never raises for a bad file.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from flamingo_cli.audio import AudioDecodeError, decode
from flamingo_cli.chunking import chunk_audio
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import AudioItem, Request


@dataclass(slots=True)
class PreparedItem:
    """An item ready for the engine, or the reason it is not."""

    error: str | None = None  # the item failed before its chunks: the text of its one error row
    # One per chunk still to caption, in chunk order. A request whose ``chunk.error`` is set (too short
    # for a sound token) is not for the engine: that chunk gets an error row instead.
    requests: list[Request] = field(default_factory=list)


def prepare(
    item: AudioItem,
    *,
    max_chunk_s: float,
    chunk_s: float | None,
    overlap_s: float,
    prompts: PromptBuilder,
    prompt: str,
    skip: Collection[int] = (),
    gates: Any = None,
) -> PreparedItem:
    """Decode ``item``, chunk it (``chunking.chunk_audio``'s settings) and render ``prompt`` for each chunk
    whose index is not in ``skip`` (the chunks already written)."""
    try:
        decoded = decode(item)
    except AudioDecodeError as exc:
        return PreparedItem(error=str(exc))
    except Exception as exc:
        return PreparedItem(error=f"{item.path}: unexpected decode error: {type(exc).__name__}: {exc}")
    try:
        chunks = chunk_audio(decoded, max_chunk_s, chunk_s, overlap_s)
    except ValueError as exc:
        return PreparedItem(error=f"{item.path}: {exc}")
    requests = [prompts.request(c, prompt) for c in chunks if c.index not in skip]
    if gates is not None:
        for request in requests:
            chunk = request.chunk
            if chunk.error is None and chunk.samples is not None:
                try:
                    gates.apply(chunk)
                except Exception as exc:  # the VAD failed on this chunk: its row says so
                    chunk.error = f"{item.path}: audio measures failed: {type(exc).__name__}: {exc}"
    return PreparedItem(requests=requests)
