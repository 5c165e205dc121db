"""flamingo's model code for vLLM, loaded in every vLLM process through the ``vllm.general_plugins``
entry point (pyproject.toml). vLLM calls ``register()`` before it resolves a checkpoint's architecture.

Kept small: only what vLLM 0.24's in-tree Audio Flamingo classes lack or must do differently.
"""

from __future__ import annotations


def register() -> None:
    """Register flamingo's model classes with vLLM's ModelRegistry (idempotent; cheap when unused)."""
