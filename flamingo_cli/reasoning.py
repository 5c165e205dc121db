"""Think models' output: the reasoning inside ``<think> … </think>`` apart from the answer.

AF-Next-think (and MF-think) write a think block before the answer. flamingo keeps the two apart (the
``reasoning`` and ``caption`` columns) and never passes a think block cut off by ``--max-tokens`` off
as a caption: that row gets an error and no caption, its partial reasoning kept.
"""

from __future__ import annotations

from dataclasses import replace

from flamingo_cli.models import THINK_CLOSE, THINK_OPEN
from flamingo_cli.records import Result

TRUNCATED_IN_THINK = "truncated in <think> at max tokens"
ENDED_IN_THINK = "ended inside <think> without an answer"


def split_reasoning(text: str, think: bool = True) -> tuple[str | None, str, bool]:
    """Split a think model's output into (reasoning, answer, truncated_in_think).

    ``<think> r </think> a`` → (r, a, False). An opened block never closed (generation stopped inside it)
    → (r, "", True): the partial reasoning is not an answer. With no tags, the whole text is the answer;
    a ``</think>`` with no opening tag (templates that open the block in the prompt) closes reasoning
    that started at the first token — only for think models, so a non-think caption is never split.
    """
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        body = stripped[len(THINK_OPEN) :]
        end = body.find(THINK_CLOSE)
        if end < 0:
            return body.strip(), "", True
        return body[:end].strip(), body[end + len(THINK_CLOSE) :].strip(), False
    if think and THINK_CLOSE in text and THINK_OPEN not in text:
        reasoning, _, answer = text.partition(THINK_CLOSE)
        return reasoning.strip(), answer.strip(), False
    return None, text, False


def with_reasoning(result: Result, think: bool) -> Result:
    """The engine's Result with a think block moved from ``caption`` to ``reasoning``."""
    if result.caption is None or result.error is not None:
        return result
    reasoning, answer, truncated = split_reasoning(result.caption, think)
    if reasoning is None:
        return result
    if truncated:
        error = TRUNCATED_IN_THINK if result.finish_reason == "length" else ENDED_IN_THINK
        return replace(result, caption=None, reasoning=reasoning, error=error)
    return replace(result, caption=answer, reasoning=reasoning)
