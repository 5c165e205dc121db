"""Chunk + task -> the exact prompt text transformers' AF3/MF processor would build.

The chat template is the checkpoint's own (``processor.chat_template``) when one is loaded, else the
template the hub conversion scripts write, with the family's system prompt. The text carries one
``<sound>`` placeholder; vLLM's AF3/MF processors expand it (AF3: ``<sound>``×n; MF: ``<|sound_bos|>``
+ ``<sound>``×n + ``<|sound_eos|>``), exactly as the HF processor does.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from flamingo_cli.models import ModelFamily, cached_snapshot
from flamingo_cli.records import Chunk, Request

_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n__SYSTEM__<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def default_chat_template(family: ModelFamily) -> str:
    """The processor chat template of the family's hub checkpoint (system prompt baked in)."""
    return _TEMPLATE.replace("__SYSTEM__", family.system_prompt)


def conversation(prompt: str) -> list[dict[str, Any]]:
    """One user turn: the audio and the instruction, as transformers' processors expect it."""
    return [{"role": "user", "content": [{"type": "audio", "path": "<audio>"}, {"type": "text", "text": prompt}]}]


def load_chat_template(model: str) -> str | None:
    """The checkpoint's processor chat template, or None (then the family's built-in copy is used).

    A local folder, else the hub id's HF-cache snapshot (vLLM has just downloaded it when it started),
    else the hub — never in offline mode, read from the environment as it is now: without network the
    hub client retries for minutes (measured: 130 s per run) before giving up.
    """
    import os

    where: str | None = model
    if not os.path.isdir(model):
        snapshot = cached_snapshot(model)
        offline = any(os.environ.get(v, "").lower() in ("1", "on", "yes", "true") for v in _OFFLINE_VARS)
        where = str(snapshot) if snapshot is not None else (None if offline else model)
    if where is None:
        return None
    try:
        from transformers import AutoProcessor

        return getattr(AutoProcessor.from_pretrained(where), "chat_template", None)
    except Exception:
        return None


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class PromptBuilder:
    """Renders chat prompts with a Jinja chat template, compiled once; each distinct prompt once."""

    def __init__(self, family: ModelFamily, chat_template: str | None = None) -> None:
        self.family = family
        self.chat_template = chat_template or default_chat_template(family)
        self._render = lru_cache(maxsize=4096)(self._render_uncached)
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The same Jinja settings transformers uses for chat templates.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        self._template = env.from_string(self.chat_template)

    def _render_uncached(self, prompt: str) -> str:
        return self._template.render(messages=conversation(prompt), add_generation_prompt=True)

    def text(self, prompt: str) -> str:
        """The full prompt string for one audio and one instruction."""
        return self._render(prompt)

    def request(self, chunk: Chunk, prompt: str) -> Request:
        return Request(chunk=chunk, prompt=prompt, text=self.text(prompt))

    def text_only(self, content: str) -> str:
        """The full prompt string of one user turn with no audio (an item's track row): the same chat
        template, the message content a plain string, so no ``<sound>`` placeholder."""
        return self._template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)
