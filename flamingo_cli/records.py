"""Small typed records that flow one way through the pipeline.

sources -> AudioItem -> audio -> DecodedAudio -> chunking -> Chunk -> prompts -> Request
-> engine -> Result -> sink.  Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True, slots=True)
class AudioItem:
    """One input to caption: a file, or a segment of one (offset/duration), plus manifest extras.

    ``path`` is a local path or a URL fsspec opens (``s3://…``; ``tar://m::s3://…`` names a shard member).
    ``data`` holds the encoded audio bytes when the source already read them (a dataset row with
    embedded audio, a WebDataset member): the decoder reads those instead of ``path``. Items stream
    lazily and the pipeline bounds how many are in flight, so only a few payloads live at once.
    """

    id: str
    path: str
    offset: float = 0.0
    duration: float | None = None
    prompt: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Where the item came from (a directory or manifest and its row), for error messages.
    origin: str = ""
    # Set when the source already knows the item is bad (missing file, bad manifest row).
    error: str | None = None
    data: bytes | None = field(default=None, repr=False)
    # The source's fingerprint (size, mtime; sha256 with --hash) once someone took it (the survey before
    # the engine, or the executor): later stages use it instead of stat'ing (or hashing) the file again.
    source: Any = field(default=None, repr=False)


@dataclass(slots=True)
class DecodedAudio:
    """16 kHz mono float32 samples of one item."""

    item: AudioItem
    samples: np.ndarray
    source_sample_rate: int | None = None
    source_channels: int | None = None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(slots=True)
class Chunk:
    """A span of an item's audio, within the model's cap. start_s/end_s are relative to the item."""

    item: AudioItem
    index: int
    num_chunks: int
    start_s: float
    end_s: float
    samples: np.ndarray | None
    duration_s: float  # duration of the whole item
    error: str | None = None  # set when the chunk cannot be captioned (e.g. too short)

    @property
    def key(self) -> tuple[str, int]:
        return (self.item.id, self.index)


@dataclass(slots=True)
class Request:
    """What the engine runs: a rendered prompt (one <sound> placeholder) and its audio."""

    chunk: Chunk
    prompt: str  # the user text, e.g. "Describe the music in detail."
    text: str  # the full chat-templated prompt handed to the engine
    request_id: str = ""


@dataclass(slots=True)
class Result:
    """One finished (item, chunk): the caption or the reason there is none."""

    chunk: Chunk
    prompt: str | None
    caption: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    prompt_token_ids: list[int] | None = None  # what the engine saw (for parity checks; not written)
    token_ids: list[int] | None = None  # what it generated
    reasoning: str | None = None  # think models: the text inside <think> … </think>


def text_hash(text: str) -> str:
    """12 hex of a text's sha256 (a schema's short name in run identities and logs)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Sampling:
    """Sampling overrides; None means "the checkpoint's generation_config decides"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_tokens: int = 512
    seed: int | None = None
    ignore_eos: bool = False
    # A JSON Schema's canonical text (flamingo_cli/schema.py): generation is constrained to it.
    json_schema: str | None = None

    def identity(self) -> dict[str, Any]:
        """What the run key hashes. Without a schema it is what it was before schemas existed (so old
        runs keep their keys); with one, the schema's hash stands for its text."""
        doc = asdict(self)
        text = doc.pop("json_schema")
        if text is not None:
            doc["json_schema"] = text_hash(text)
        return doc
