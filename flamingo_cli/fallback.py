"""The quality stage of an executor's result loop: flags, and ``--fallback``'s temperature ladder.

Every engine Result passes ``Ladder.judge`` on its way to the sink: it gets its ``flags``
(``quality.flags_for``). Without ``--fallback`` that is all, one Result in, one out. With it, a Result
whose flags meet the re-ask set (``FallbackPolicy.on``; default repetition, low_confidence, empty) is
held back and its chunk asked again through the same engine, in the same run, one rung up Whisper's
temperature ladder (0.0, 0.2, 0.4, 0.6, 0.8, 1.0): the first ask uses the run's own sampling, each
re-ask the next temperature above it, with its own seed (``engine.request_seed`` adds the attempt
number, so a seed gives the same ladder every time, batching aside). The chunk ends at its first
attempt without a re-ask flag, or when the ladder is spent; then one Result goes on, the kept attempt:
the first good one, else (like faster-whisper) the one with the fewest re-ask flags, then the best
``avg_logprob``, then the earliest. Its ``attempts`` says how many requests the chunk took.

Exactly once and resume: intermediate attempts are never written, only the chunk's final Result, so
a run that dies mid-ladder has no row for the chunk and resume asks it again from the first attempt.
A stop (SIGINT/SIGTERM) re-asks nothing more: re-asks waiting for the engine are dropped (redone on
resume), attempts already running finish and end their ladders.

``truncated`` is not in the default re-ask set: a caption cut at ``--max-tokens`` is usually just
long, and a hotter sample is no shorter; a loop that ran into the limit is flagged ``repetition`` too.
Error rows (the engine refused, invalid think output) are final: ``--retry-failed`` is their remedy.

The re-asks reach the engine through ``RetryFeed``, a view of the executor's feed that serves re-asks
first and holds the feed's end back while a ladder is open (the engine would otherwise stop taking
requests before the last re-ask).
"""

from __future__ import annotations

import contextlib
import math
import queue
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from flamingo_cli.engine import END
from flamingo_cli.quality import (
    DEFAULT_RULES,
    EMPTY,
    LOW_CONFIDENCE,
    REPETITION,
    QualityRules,
    flags_for,
    measures_of,
)
from flamingo_cli.records import TRACK_INDEX, Request, Result

# Whisper's temperature ladder (openai/whisper transcribe.py: temperature=(0.0, 0.2, ..., 1.0)).
WHISPER_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEFAULT_ON = (REPETITION, LOW_CONFIDENCE, EMPTY)


@dataclass(frozen=True)
class FallbackPolicy:
    """Which flags send a chunk back, and the temperature ladder it climbs."""

    on: frozenset[str] = frozenset(DEFAULT_ON)
    temperatures: tuple[float, ...] = WHISPER_TEMPERATURES

    def rungs(self, first: float) -> tuple[float, ...]:
        """The re-asks' temperatures after a first ask at ``first``: the ladder's steps above it."""
        return tuple(t for t in sorted(set(self.temperatures)) if t > first + 1e-9)

    def identity(self) -> dict[str, Any]:
        return {"on": sorted(self.on), "temperatures": sorted(set(self.temperatures))}


@dataclass(slots=True)
class _Open:
    """A chunk on the ladder: attempts made, the best so far."""

    attempts: int
    best: Result


class RetryFeed:
    """The engine's view of the executor's feed: re-asks first, then the feed; the feed's END is held
    while a request it gave out has not come back judged (its answer may send the chunk up the
    ladder), and given once all have, on a stop, or to a blocking ``get``: engines (``engine.Engine``)
    block on the feed only while they run nothing, so what they still hold (vLLM's rejections kept
    back until it accepts a request) comes without more input.

    Requests are taken and re-asks added by the one thread that runs the engine (the engine takes
    between its results), so no lock is needed here; the feed itself is the executor's queue."""

    def __init__(self, feed: queue.Queue, ladder: Ladder) -> None:
        self.inner, self.ladder = feed, ladder
        self._retries: deque[Request] = deque()
        self._ended = False

    def retry(self, request: Request) -> None:
        self._retries.append(request)

    def drop_retries(self) -> list[Request]:
        dropped = list(self._retries)
        self._retries.clear()
        return dropped

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        request = self._take(block, timeout)
        if request is not END:
            self.ladder.out += 1
        return request

    def _take(self, block: bool, timeout: float | None) -> Any:
        if self._retries:
            return self._retries.popleft()
        if not self._ended:
            item = self.inner.get(block, timeout)
            if item is not END:
                return item
            self._ended = True
        if self.ladder.stopped or not self.ladder.out or block:
            return END
        raise queue.Empty  # END held: a re-ask may come with a running request's answer

    def get_nowait(self) -> Any:
        return self.get(False)


def _rank(result: Result, on: frozenset[str]) -> tuple[int, float, int]:
    """Lower is better: fewer re-ask flags, a higher avg_logprob (none counts lowest), earlier."""
    bad = len(set(result.flags or ()) & on)
    logprob = result.avg_logprob if result.avg_logprob is not None else -math.inf
    return bad, -logprob, result.attempts


def _key(chunk: Any) -> tuple[str, int, int]:
    """A chunk's place on the ladder: (id, chunk, task) — a several-task run asks one chunk per task."""
    return (chunk.item.id, chunk.index, getattr(chunk, "task", 0))


class Ladder:
    """Flags each engine Result; with a ``FallbackPolicy``, re-asks flagged chunks (module docstring).

    ``job``: the executor's ``planner.CaptionJob`` (its ``quality`` rules, ``fallback`` policy,
    ``sampling`` and ``prompts``); ``engine``: for the first ask's effective temperature; ``stats``: a
    ``planner.Stats`` to count re-asks in; ``feed``: the executor's request feed (needed with a policy).
    """

    def __init__(
        self,
        job: Any,
        engine: Any = None,
        stats: Any = None,
        feed: queue.Queue | None = None,
        jobs: Sequence[Any] = (),
    ) -> None:
        self.rules: QualityRules = getattr(job, "quality", None) or DEFAULT_RULES
        self.policy: FallbackPolicy | None = getattr(job, "fallback", None)
        self.job, self.stats = job, stats
        # A several-task run (issue 26): each task's job by ``chunk.task`` (a re-ask keeps its task's
        # sampling and prompt); the ladder's rungs start above task 0's temperature.
        self.jobs = tuple(jobs) or (job,)
        self.stopped = False
        self.out = 0  # requests the engine took from ``feed`` whose Result has not been judged
        self._open: dict[tuple[str, int], _Open] = {}
        self.feed: Any = feed
        self.rungs: tuple[float, ...] = ()
        if self.policy is not None:
            if feed is None:
                raise ValueError("--fallback needs the executor's feed")
            self.feed = RetryFeed(feed, self)
            self.rungs = self.policy.rungs(first_temperature(job.sampling, engine))

    def judge(self, result: Result) -> Result | None:
        """The Result to write, flagged; None when its chunk was sent up the ladder instead."""
        self.out -= 1
        state = self._open.pop(_key(result.chunk), None)
        attempts = 1 if state is None else state.attempts + 1
        flags = flags_for(result, measures_of(result.chunk), self.rules)
        result = replace(result, flags=None if flags is None else tuple(flags), attempts=attempts)
        policy = self.policy
        if policy is None:
            return result
        if flags is None:  # an error ends the ladder: the best earlier attempt, if any
            return result if state is None else self._final(state.best, attempts, re_asked=True)
        best = result if state is None or _rank(result, policy.on) < _rank(state.best, policy.on) else state.best
        track = result.chunk.index == TRACK_INDEX  # a track row's text prompt is not re-built: judged only
        if not set(flags) & policy.on or self.stopped or attempts > len(self.rungs) or track:
            return self._final(best, attempts, re_asked=state is not None)
        self._ask_again(result, attempts, best)
        return None

    def _ask_again(self, result: Result, attempts: int, best: Result) -> None:
        task = getattr(result.chunk, "task", 0)
        job = self.jobs[task] if task < len(self.jobs) else self.job
        sampling = replace(job.sampling, temperature=self.rungs[attempts - 1])
        request = replace(job.prompts.request(result.chunk, result.prompt), sampling=sampling, attempt=attempts)
        self._open[_key(result.chunk)] = _Open(attempts, best)
        self.feed.retry(request)
        self._count(chunks=int(attempts == 1), attempts=1)

    def _final(self, best: Result, attempts: int, re_asked: bool) -> Result:
        if re_asked and self.policy is not None and not set(best.flags or ()) & self.policy.on:
            self._count(recovered=1)
        return replace(best, attempts=attempts)

    def dropped(self, result: Result) -> None:
        """An attempt the engine aborted (a stop): its chunk leaves the ladder, unwritten."""
        self.out -= 1
        self._open.pop(_key(result.chunk), None)

    def stop(self) -> int:
        """A stop: no more re-asks; those waiting for the engine are dropped. Returns how many."""
        self.stopped = True
        if not isinstance(self.feed, RetryFeed):
            return 0
        dropped = self.feed.drop_retries()
        for request in dropped:
            self._open.pop(_key(request.chunk), None)
        return len(dropped)

    def _count(self, chunks: int = 0, attempts: int = 0, recovered: int = 0) -> None:
        stats = self.stats
        if stats is None:
            return
        with stats.lock:
            stats.fallback_chunks += chunks
            stats.fallback_attempts += attempts
            stats.fallback_recovered += recovered


def first_temperature(sampling: Any, engine: Any = None) -> float:
    """The temperature of a chunk's first ask: the engine's effective one (checkpoint defaults merged),
    else the run's, else 0 (greedy)."""
    value = None
    if engine is not None:
        with contextlib.suppress(Exception):
            value = (engine.effective_sampling(sampling) or {}).get("temperature")
    if value is None:
        value = getattr(sampling, "temperature", None)
    return float(value or 0.0)


def parse_temperatures(
    value: str | Sequence[float] | None, option: str = "--fallback-temperatures"
) -> tuple[float, ...]:
    """``0,0.2,0.4`` (or a list) as a sorted ladder; ValueError naming ``option`` for a bad one."""
    if value is None:
        return WHISPER_TEMPERATURES
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        temps = sorted({float(p) for p in parts if p != ""})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{option} {value!r}: expected temperatures like 0,0.2,0.4") from exc
    if not temps or any(t < 0 or not math.isfinite(t) for t in temps):
        raise ValueError(f"{option} {value!r}: expected temperatures ≥ 0, like 0,0.2,0.4")
    return tuple(temps)
