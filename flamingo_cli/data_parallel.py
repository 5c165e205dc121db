"""Data parallel: one engine replica per GPU (or per GPU group), fed from one queue, behind ``Engine``.

Why not vLLM's own data-parallel mode: offline ``LLM`` runs one replica per process, and its DP mode
needs one launcher process per rank plus a coordinator. Here each replica is a spawned worker process
that owns a ``VllmEngine`` (``CUDA_VISIBLE_DEVICES`` set to its GPUs before torch loads), while the
parent keeps everything else: decoding, prompts, the single ``Sink`` and its exactly-once resume. The
parent sends each request to the replica with the fewest requests (and audio seconds) in flight, so a
slow replica gets less work; in-flight work per replica is capped like the single engine's, which
bounds host memory. Results come back without their audio (the parent still holds the request).

A replica that dies (OOM, GPU fault) ends the run with ``EngineError`` (exit 3); what finished is
already written, and the same command resumes. vLLM's processes of every replica are descendants of
this process, so ``env.reap_children_on_exit`` stops them with it.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from flamingo_cli.engine import (
    END,
    EngineConfig,
    EngineError,
    Sampling,
    effective_sampling,
    in_flight_cap,
    sampling_kwargs,
)
from flamingo_cli.records import Request, Result

DEFAULT_FACTORY = "flamingo_cli.engine:VllmEngine"
_RESULT_FIELDS = (
    "caption",
    "reasoning",
    "finish_reason",
    "prompt_tokens",
    "output_tokens",
    "error",
    "prompt_token_ids",
    "token_ids",
    "avg_logprob",  # confidence (issue 25b)
)


# --- which devices ------------------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (no torch import).

    ``CUDA_VISIBLE_DEVICES`` wins when set; else ``nvidia-smi`` lists them; no driver, no GPUs.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def _visible_text(n: int, wanted: list[int]) -> str:
    """What the host has, in words: "no GPUs visible on this host (asked for 0)" rather than "(0..-1)"."""
    asked = ",".join(map(str, wanted))
    if n == 0:
        return f"no GPUs visible on this host (asked for {asked}); use --gpus none to run on the CPU"
    have = "GPU 0" if n == 1 else f"GPUs 0..{n - 1}"
    return f"this host has {n} visible GPU{'s' if n != 1 else ''} ({have}); asked for {asked}"


def replica_devices(gpus: str | None, tensor_parallel_size: int = 1, replicas: int | None = None) -> list[str | None]:
    """One entry per engine replica: the ``CUDA_VISIBLE_DEVICES`` it gets, or None (no GPU pinning).

    ``gpus``: "all"/None (every visible GPU), "none" (CPU), or comma-separated indexes into the visible
    GPUs. Each replica takes ``tensor_parallel_size`` GPUs. ``replicas`` caps (or, without GPUs, sets)
    the count; a multiple of the GPU groups puts that many replicas on each group (their memory budget
    split; DataParallelEngine starts them one after another): on short clips one engine's CPU side
    cannot keep a GPU busy. Raises ValueError on a bad spec.
    """
    if tensor_parallel_size < 1:
        raise ValueError("--tensor-parallel-size must be ≥ 1")
    if replicas is not None and replicas < 1:
        raise ValueError("--replicas must be ≥ 1")
    spec = (gpus or "all").strip().lower()
    visible = visible_gpus() if spec != "none" else []
    if spec in ("all", "none"):
        chosen = visible
    else:
        try:
            wanted = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError as exc:
            raise ValueError(f"--gpus {gpus!r}: expected 'all', 'none' or indexes like 0,1,3") from exc
        bad = [i for i in wanted if not 0 <= i < len(visible)]
        if bad or len(set(wanted)) != len(wanted) or not wanted:
            raise ValueError(f"--gpus {gpus!r}: {_visible_text(len(visible), wanted)}")
        chosen = [visible[i] for i in wanted]
    if not chosen:  # CPU engine(s): no pinning
        return [None] * (replicas or 1)
    if len(chosen) < tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} needs that many GPUs; {len(chosen)} chosen")
    groups = [
        ",".join(chosen[i : i + tensor_parallel_size])
        for i in range(0, len(chosen) - tensor_parallel_size + 1, tensor_parallel_size)
    ]
    if replicas is not None:
        if replicas > len(groups):
            if replicas % len(groups):
                raise ValueError(
                    f"--replicas {replicas} with {len(groups)} GPU group(s): more replicas than groups must be a "
                    f"multiple of them ({len(groups) * (replicas // len(groups) + 1)} = "
                    f"{replicas // len(groups) + 1} per group), or at most {len(groups)}"
                )
            return [g for _ in range(replicas // len(groups)) for g in groups]
        groups = groups[:replicas]
    return list(groups)


# --- the worker process -----------------------------------------------------------------------------------


def _load(factory: str) -> Callable[[EngineConfig], Any]:
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)


def _defaults_dict(defaults: Any) -> dict[str, Any]:
    """An engine's checkpoint sampling defaults as a dict (a mapping, or an object with the fields)."""
    if defaults is None:
        return {}
    if isinstance(defaults, dict):
        return dict(defaults)
    fields = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")
    return {name: getattr(defaults, name) for name in fields if getattr(defaults, name, None) is not None}


def _result_fields(result: Result) -> dict[str, Any]:
    return {name: getattr(result, name) for name in _RESULT_FIELDS}


def _worker_main(wid: int, devices: str | None, config: EngineConfig, factory: str, inbox, outbox) -> None:
    """Own one engine; run requests from ``inbox`` until "close"; report on ``outbox``.

    Messages in: ("run", Sampling), ("req", key, Request), ("end",), ("abort",), ("close",).
    Out: ("ready", wid, info), ("error", wid, message), ("res", wid, key, fields), ("done", wid),
    ("fatal", wid, message).
    """
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    # The parent decides how to stop (it ends the feed, or aborts); a Ctrl-C to the process group must
    # not kill a replica mid-step. vLLM's own processes still get it, as with one engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = _load(factory)(config)
    except BaseException as exc:
        outbox.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        return
    torch = sys.modules.get("torch")  # loaded with vLLM; an engine without torch has no threads to cap
    if torch is not None and config.replica_threads:
        torch.set_num_threads(config.replica_threads)
    with contextlib.suppress(Exception):
        from flamingo_cli.engine import watch_engine_death

        watch_engine_death(engine)
    info = {
        "versions": getattr(engine, "versions", {}),
        "defaults": _defaults_dict(getattr(engine, "defaults", None)),
        "pid": os.getpid(),
        "in_flight": getattr(engine, "in_flight", None),  # what this replica's engine keeps at once
    }
    outbox.put(("ready", wid, info))
    try:
        _serve(wid, engine, inbox, outbox)
    except BaseException as exc:
        outbox.put(("fatal", wid, f"{type(exc).__name__}: {exc}"))
    finally:
        with contextlib.suppress(Exception):
            engine.close()


def _serve(wid: int, engine: Any, inbox, outbox) -> None:
    while True:
        msg = inbox.get()
        if msg[0] == "close":
            return
        if msg[0] != "run":
            continue  # a stray "end"/"abort" between runs
        sampling: Sampling = msg[1]
        feed: queue.Queue = queue.Queue()
        keys: dict[int, tuple[int, Request]] = {}
        closing = threading.Event()

        def pump(feed: queue.Queue = feed, keys: dict = keys, closing: threading.Event = closing) -> None:
            # Moves the parent's messages onto this run's local feed (the engine reads it between steps).
            while True:
                m = inbox.get()
                if m[0] == "req":
                    keys[id(m[2].chunk)] = (m[1], m[2])
                    feed.put(m[2])
                elif m[0] == "abort":
                    with contextlib.suppress(Exception):
                        engine.abort_all()
                elif m[0] == "drop":
                    drop = getattr(engine, "drop_waiting", None)
                    if drop is not None:
                        drop()
                elif m[0] in ("end", "close"):
                    if m[0] == "close":
                        closing.set()
                    feed.put(END)
                    return

        pumper = threading.Thread(target=pump, name=f"flamingo-replica{wid}-pump", daemon=True)
        pumper.start()
        for result in engine.run(feed, sampling):
            key, _ = keys.pop(id(result.chunk), (None, None))
            if key is not None:
                outbox.put(("res", wid, key, _result_fields(result)))
        pumper.join()
        outbox.put(("done", wid))
        if closing.is_set():
            return


# --- the parent side ---------------------------------------------------------------------------------------


class DataParallelEngine:
    """``Engine`` over N replica processes; same ``run``/``abort_all``/``close`` as ``VllmEngine``."""

    def __init__(
        self,
        config: EngineConfig,
        devices: Sequence[str | None],
        factory: str = DEFAULT_FACTORY,
        start_timeout: float = 3600.0,
    ) -> None:
        if len(devices) < 1:
            raise ValueError("at least one replica")
        self.config = config
        self.devices = list(devices)
        # Each replica keeps the single engine's caps; the parent spreads requests over them. Replicas
        # that share a GPU split its memory budget.
        self.replica_config = replace(config, devices=())
        shares = Counter(d for d in self.devices if d is not None)
        self.replica_configs = [
            replace(self.replica_config, gpu_memory_utilization=config.gpu_memory_utilization / shares[dev])
            if dev is not None and shares[dev] > 1
            else self.replica_config
            for dev in self.devices
        ]
        self.factory = factory
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._outbox = self._ctx.Queue()
        self._inboxes = [self._ctx.Queue() for _ in self.devices]
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(i, dev, self.replica_configs[i], factory, self._inboxes[i], self._outbox),
                name=f"flamingo-replica{i}",
                daemon=False,
            )
            for i, dev in enumerate(self.devices)
        ]
        # Replicas on one GPU start one after another: vLLM sizes its KV cache from a memory profile
        # that another engine starting on the same GPU would disturb.
        self._after: dict[int, int] = {}  # wid -> the replica on its GPU that starts once wid is ready
        last: dict[str, int] = {}
        for wid, dev in enumerate(self.devices):
            if dev is None:
                continue
            if dev in last:
                self._after[last[dev]] = wid
            last[dev] = wid
        self.llm = self  # "running" marker for engine.watch_engine_death and the engine cache
        self.versions: dict[str, str] = {}
        self.defaults: dict[str, Any] = {}
        self.pids: list[int] = []
        self.peak_in_flight = 0  # most requests out at the replicas at once (memory bound, tests)
        held = set(self._after.values())  # started by _await_ready, once the one before is up
        for wid, p in enumerate(self._procs):
            if wid not in held:
                p.start()
        try:
            self._await_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    def _where(self, wid: int) -> str:
        dev = self.devices[wid]
        return f"replica {wid}" + (f" (GPU {dev})" if dev is not None else "")

    def _await_ready(self, timeout: float) -> None:
        ready: dict[int, dict[str, Any]] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        failed: set[int] = set()

        def settle(wid: int, ok: bool) -> None:
            # The next replica on this GPU starts once this one is up; after a failure it never starts.
            nxt = self._after.get(wid)
            while nxt is not None and not ok:
                errors.append(f"{self._where(nxt)}: not started (a replica before it on this GPU failed)")
                failed.add(nxt)
                nxt = self._after.get(nxt)
            if nxt is not None:
                self._procs[nxt].start()

        while len(ready) + len(failed) < len(self._procs):
            try:
                msg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                for wid, p in enumerate(self._procs):
                    if wid in ready or wid in failed or p.pid is None:  # pid None: held back, not started
                        continue
                    if not p.is_alive() and p.exitcode not in (None, 0):
                        errors.append(f"{self._where(wid)} exited with code {p.exitcode} while starting")
                        failed.add(wid)
                        settle(wid, ok=False)
                if time.monotonic() > deadline:
                    raise EngineError(f"engine replicas did not start within {timeout:.0f} s") from None
                continue
            if msg[0] == "ready":
                ready[msg[1]] = msg[2]
                settle(msg[1], ok=True)
            elif msg[0] == "error":
                errors.append(f"{self._where(msg[1])}: {msg[2]}")
                failed.add(msg[1])
                settle(msg[1], ok=False)
        if errors:
            raise EngineError("engine replica(s) could not start: " + "; ".join(errors))
        first = ready[0]
        self.versions = dict(first.get("versions", {}))
        self.defaults = dict(first.get("defaults", {}))
        self.pids = [ready[i].get("pid", 0) for i in range(len(self._procs))]
        # each replica is sent at most what its engine keeps in flight (vLLM's batch cap there)
        self.caps = [
            ready[i].get("in_flight") or in_flight_cap(self.config.max_in_flight, None) for i in range(len(self._procs))
        ]

    def effective_sampling(self, sampling: Sampling) -> dict[str, Any]:
        """What the replicas will use: the overrides over the checkpoint's generation_config."""
        seed = self.config.seed if sampling.seed is None else sampling.seed
        return effective_sampling(sampling_kwargs(sampling, self.defaults), seed)

    def alive(self) -> bool:
        return self.llm is not None and all(p.is_alive() for p in self._procs)

    def drop_waiting(self) -> None:
        """A stop: every replica drops the requests it has not started (they come back as aborted)."""
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(("drop",))

    def _check_alive(self) -> None:
        for wid, p in enumerate(self._procs):
            if not p.is_alive():
                raise EngineError(f"engine {self._where(wid)} died (exit code {p.exitcode})")

    def run(self, feed: queue.Queue, sampling: Sampling, on_step: Callable[[], None] | None = None) -> Iterator[Result]:
        if self.llm is None:
            raise EngineError("the engine replicas were closed")
        n = len(self._procs)
        for inbox in self._inboxes:
            inbox.put(("run", sampling))
        inflight: dict[int, tuple[int, Request]] = {}
        count = [0] * n
        audio = [0.0] * n
        finished: set[int] = set()

        def seconds(request: Request) -> float:
            return request.audio_s

        clean = False
        try:
            yield from self._loop(feed, on_step, inflight, count, audio, finished, seconds)
            clean = True
        finally:
            if not clean:  # the consumer or a replica failed mid-run: replicas are in an unknown state
                self.close(timeout=10)

    def _loop(self, feed, on_step, inflight, count, audio, finished, seconds) -> Iterator[Result]:
        cfg = self.config
        n = len(self._procs)
        caps = getattr(self, "caps", None) or [in_flight_cap(cfg.max_in_flight, None)] * n
        fed_all = False
        key = 0
        last_check = time.monotonic()
        while len(finished) < n:
            # Dispatch while some replica has room: the least loaded first.
            while not fed_all:
                open_ = [w for w in range(n) if count[w] < caps[w] and audio[w] < cfg.max_in_flight_audio_s]
                if not open_:
                    break
                try:
                    request = feed.get(block=not inflight, timeout=0.1)
                except queue.Empty:
                    break
                if request is END:
                    fed_all = True
                    for inbox in self._inboxes:
                        inbox.put(("end",))
                    break
                wid = min(open_, key=lambda w: (count[w], audio[w]))
                key += 1
                inflight[key] = (wid, request)
                count[wid] += 1
                audio[wid] += seconds(request)
                self._inboxes[wid].put(("req", key, request))
                self.peak_in_flight = max(self.peak_in_flight, len(inflight))
            try:
                msg = self._outbox.get(timeout=0.02 if not fed_all else 0.2)
            except queue.Empty:
                msg = None
            if msg is not None:
                kind = msg[0]
                if kind == "res":
                    wid, rkey, fields = msg[1], msg[2], msg[3]
                    entry = inflight.pop(rkey, None)
                    if entry is not None:
                        _, request = entry
                        count[wid] -= 1
                        audio[wid] -= seconds(request)
                        yield Result(chunk=request.chunk, prompt=request.prompt, **fields)
                elif kind == "done":
                    finished.add(msg[1])
                elif kind == "fatal":
                    raise EngineError(f"the vLLM engine of {self._where(msg[1])} failed: {msg[2]}")
            if on_step:
                on_step()
            now = time.monotonic()
            if now - last_check > 1.0:
                last_check = now
                self._check_alive()

    def abort_all(self) -> None:
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(("abort",))

    def close(self, timeout: float = 60.0) -> None:
        if self.llm is None:
            return
        self.llm = None
        for inbox in self._inboxes:
            with contextlib.suppress(Exception):
                inbox.put(("close",))
        deadline = time.monotonic() + timeout
        started = [p for p in self._procs if p.pid is not None]  # a replica held back never started
        for p in started:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in started:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in (*self._inboxes, self._outbox):
            with contextlib.suppress(Exception):
                q.cancel_join_thread()
                q.close()
