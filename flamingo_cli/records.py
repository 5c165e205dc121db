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


def duplicate_reason(item_id: str, detail: str) -> str:
    """The error of an item whose id came before: ``duplicate id 'x' (first at row 2)``."""
    return f"duplicate id {item_id!r} ({detail})"


def duplicate_row(item: AudioItem, reason: str, item_id: str | None = None) -> AudioItem:
    """The error row that stands for a duplicate: id (or ``item_id``), path, origin and extras, no audio."""
    return AudioItem(id=item_id or item.id, path=item.path, origin=item.origin, extra=item.extra, error=reason)


class SeenIds:
    """The ids one stream of items has given out, and where each came first: the one duplicate-id check
    of manifest rows, dataset rows and the inputs of a run (whose second sighting of an id is an error row).

    ``label`` goes before the remembered place in messages (``"row "``: "first at row 2").
    """

    def __init__(self, label: str = "") -> None:
        self._label = label
        self._first: dict[str, Any] = {}
        self._repeats: dict[str, int] = {}  # only ids seen twice or more: a million unique ids cost one dict

    def add(self, item_id: str, where: Any = None) -> int:
        """Count one item with this id; how many came before it (0: the first, and ``where`` is kept)."""
        if item_id not in self._first:
            self._first[item_id] = where
            return 0
        count = self._repeats.get(item_id, 0) + 1
        self._repeats[item_id] = count
        return count

    def check(self, item: AudioItem, where: Any) -> AudioItem:
        """The item when its id is new here (remembering ``where``), else its duplicate-id error row."""
        if self.add(item.id, where) == 0:
            return item
        return duplicate_row(item, duplicate_reason(item.id, f"first at {self._label}{self._first[item.id]}"))


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


# The chunk_index of an item's track row (issue 26): one caption of the whole item, made from its chunks'
# captions by a text-only request; (id, -1) never collides with a chunk's key.
TRACK_INDEX = -1


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
    # gates.Measures (level, audio hash, speech; its gate when the chunk is not sent), set by prepare.
    measures: Any = None
    # Which task of a several-task run (issue 26: ``--task a --task b``) the chunk is asked for: its
    # result goes to that task's run. 0 in a one-task run.
    task: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.item.id, self.index)


@dataclass(slots=True)
class Request:
    """What the engine runs: a rendered prompt (one <sound> placeholder) and its audio; or, with
    ``chunk.samples`` None, a text-only prompt (an item's track row)."""

    chunk: Chunk
    prompt: str  # the user text, e.g. "Describe the music in detail."
    text: str  # the full chat-templated prompt handed to the engine
    request_id: str = ""
    # This request's own sampling (None: the run's, as handed to ``engine.run``): a several-task run's
    # tasks each keep their preset's sampling, and a re-ask of a flagged chunk (--fallback, issue 25b)
    # samples with its own; ``attempt``: the chunk's ``attempt``-th re-ask (0: the first ask; it seeds
    # the sampler).
    sampling: Sampling | None = None
    attempt: int = 0

    @property
    def audio_s(self) -> float:
        """Seconds of audio the request carries: 0 for a text-only one (``chunk.samples`` is None)."""
        return 0.0 if self.chunk.samples is None else self.chunk.end_s - self.chunk.start_s


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
    # gates (flamingo_cli/gates.py): "silence" | "duplicate" when no engine request was made; a duplicate
    # names the chunk whose answer it carries.
    gate: str | None = None
    duplicate_of: str | None = None
    duplicate_of_chunk: int | None = None
    # confidence (issue 25b): the mean log-probability of the generated tokens (None: not asked for, or
    # none), the quality flags (flamingo_cli/quality.py; None: not judged yet) and the engine requests
    # this row took (more than 1 only with --fallback).
    avg_logprob: float | None = None
    flags: tuple[str, ...] | None = None
    attempts: int = 1


def error_result(item: AudioItem, reason: str) -> Result:
    """A Result for an item that failed before chunking: one row with num_chunks = 0."""
    nan = float("nan")
    chunk = Chunk(item=item, index=0, num_chunks=0, start_s=nan, end_s=nan, samples=None, duration_s=nan, error=reason)
    return Result(chunk=chunk, prompt=item.prompt, error=reason)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a source file looked like when it was captioned: size and mtime, and sha256 with --hash."""

    size: int
    mtime_ns: int
    sha256: str | None = None


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
    # Ask the engine for the sampled tokens' log-probabilities (the avg_logprob column; --logprobs). Off
    # by default: on an H100 they cost ~20 % of throughput (BENCHMARKS.md, 2026-12-07). Not in the run
    # key: it does not change what is generated.
    logprobs: bool = False

    def identity(self) -> dict[str, Any]:
        """What the run key hashes. Without a schema it is what it was before schemas existed (so old
        runs keep their keys); with one, the schema's hash stands for its text."""
        doc = asdict(self)
        doc.pop("logprobs")
        text = doc.pop("json_schema")
        if text is not None:
            doc["json_schema"] = text_hash(text)
        return doc
