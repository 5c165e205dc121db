"""Which engine runs an ``EngineConfig``: vLLM in this process, or one replica process per GPU group.

The factory sits above what it builds (``engine.VllmEngine``, ``data_parallel.DataParallelEngine``),
so neither of those imports the other's module. Engines are cached per configuration per process: an
engine takes a minute or more to start, and tests and notebooks run many jobs on one.
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import asdict
from typing import Any

from flamingo_cli.engine import EngineConfig, VllmEngine

_CACHE: dict[tuple, list[Any]] = {}


def get_engine(config: EngineConfig) -> Any:
    """The engine for ``config``, started on first use.

    Two or more ``config.devices`` give a ``DataParallelEngine`` (one replica process each); one
    device pins this process's engine to it (``CUDA_VISIBLE_DEVICES``, set before vLLM loads).
    """
    key = tuple(sorted((k, repr(v)) for k, v in asdict(config).items() if k != "max_chunk_s"))
    # An engine sized for longer chunks serves shorter ones: reuse the smallest that fits.
    fits = [e for e in _CACHE.get(key, []) if e.llm is not None and e.config.max_chunk_s >= config.max_chunk_s]
    engine = min(fits, key=lambda e: e.config.max_chunk_s) if fits else None
    if engine is None:
        for old in _CACHE.pop(key, []):  # one engine per configuration: the smaller one goes
            old.close()
        _evict(keep=max(0, _max_engines() - 1))  # room for the new one: each holds its KV cache
        t0 = time.perf_counter()
        if len(config.devices) > 1:
            from flamingo_cli.data_parallel import DataParallelEngine

            engine = DataParallelEngine(config, config.devices)
        else:
            if config.devices and config.devices[0] is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = config.devices[0]
            engine = VllmEngine(config)
        if not _CACHE:
            atexit.register(close_all)
        engine.start_seconds = time.perf_counter() - t0
        _CACHE.setdefault(key, []).append(engine)
    _CACHE[key] = _CACHE.pop(key)  # most recently used last
    return engine


def _max_engines() -> int:
    """Engines kept alive in one process (``FLAMINGO_MAX_ENGINES``, default 2): notebooks and test
    suites switch between a few models; more would hold a KV cache each until memory runs out."""
    try:
        return max(1, int(os.environ.get("FLAMINGO_MAX_ENGINES", "2")))
    except ValueError:
        return 2


def _evict(keep: int) -> None:
    """Close the least recently used engines until at most ``keep`` remain."""
    while sum(len(v) for v in _CACHE.values()) > keep and _CACHE:
        oldest = next(iter(_CACHE))
        for engine in _CACHE.pop(oldest):
            engine.close()


def close_all() -> None:
    for engines in _CACHE.values():
        for engine in engines:
            engine.close()
    _CACHE.clear()
