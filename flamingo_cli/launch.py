"""Which engine runs an ``EngineConfig``, and starting it: vLLM in this process, or one replica process
per GPU group.

The factory sits above what it builds (``engine.VllmEngine``, ``data_parallel.DataParallelEngine``),
so neither of those imports the other's module. Engines are cached per configuration per process: an
engine takes a minute or more to start, and tests and notebooks run many jobs on one. The processes an
engine starts (vLLM's engine core, flamingo's replicas) are spawned without re-running the caller's
main script, so a script that calls ``flamingo_cli.caption`` at module level (no ``__main__`` guard)
runs once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
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
        with main_script_kept_out():
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


# -- spawned engine processes and the caller's main script ------------------------------------------------

_SPAWN_LOCK = threading.Lock()
_spawn_state: dict[str, Any] = {"depth": 0, "original": None}


@contextlib.contextmanager
def main_script_kept_out() -> Iterator[None]:
    """While engine processes start, a spawned child does not re-run the parent's main script.

    multiprocessing's spawn (vLLM's engine core on CPU or with CUDA live, flamingo's replicas always)
    first runs the parent's ``__main__`` file (or ``-m`` module) in the child as ``__mp_main__``, so
    that functions pickled from it resolve there (CPython's ``multiprocessing.spawn``:
    ``get_preparation_data`` -> ``_fixup_main_from_path``). These children run vLLM's and flamingo's
    own functions only; re-running a user's script there would call ``caption`` again inside the
    engine process (and meet the run's lock). Other processes spawned from other threads meanwhile
    also skip it; nesting is fine.
    """
    from multiprocessing import spawn

    with _SPAWN_LOCK:
        if _spawn_state["depth"] == 0:
            original = _spawn_state["original"] = spawn.get_preparation_data

            def without_main(name: str) -> dict[str, Any]:
                data = original(name)
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
                return data

            spawn.get_preparation_data = without_main
        _spawn_state["depth"] += 1
    try:
        yield
    finally:
        with _SPAWN_LOCK:
            _spawn_state["depth"] -= 1
            if _spawn_state["depth"] == 0:
                spawn.get_preparation_data = _spawn_state["original"]


def refuse_to_rerun_in_a_spawned_child(call: str) -> None:
    """Stop with one line when ``call`` runs while a spawned process re-runs the parent's main script.

    A process started without ``main_script_kept_out`` (by other code) still re-runs it; a ``caption``
    at the script's top level would then run again inside that process. Exits that process (status 2).
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        sys.stderr.write(
            f"flamingo: {call} ran again in a process that multiprocessing spawned, which re-runs your script; "
            'put the call under `if __name__ == "__main__":`\n'
        )
        sys.stderr.flush()
        raise SystemExit(2)
