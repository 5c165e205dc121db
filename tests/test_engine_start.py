"""The in-process engine's start: the log-mel device per request (so vLLM can fork its engine process),
the warm-up inside the engine start, and the spawn retry when a fork could not use CUDA."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from flamingo_cli.engine import (
    FORKED_CUDA,
    EngineConfig,
    VllmEngine,
    forked_cuda_failed,
    in_flight_cap,
    split_mel_device,
)
from flamingo_cli.models import AF3
from flamingo_cli.vllm_args import engine_kwargs


def test_the_mel_device_leaves_the_engine_wide_kwargs_for_each_request():
    config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0)
    kwargs = engine_kwargs(config, use_gpu=True)
    assert kwargs["mm_processor_kwargs"] == {"device": "cuda"}  # the Ray path keeps it engine-wide
    assert split_mel_device(kwargs) == {"device": "cuda"}
    assert "mm_processor_kwargs" not in kwargs  # LLM() never sees "cuda": its dummy request stays on the CPU
    # a user's own processor kwargs stay engine-wide; only the device moves
    mixed = {"mm_processor_kwargs": {"device": "cuda", "padding": "longest"}}
    assert split_mel_device(mixed) == {"device": "cuda"} and mixed == {"mm_processor_kwargs": {"padding": "longest"}}
    # the CPU (the processor's default) needs nothing
    cpu = engine_kwargs(EngineConfig(model="m", family=AF3, max_chunk_s=30.0, mel_device="cpu"), use_gpu=True)
    assert split_mel_device(cpu) == {} and "mm_processor_kwargs" not in cpu
    assert split_mel_device(engine_kwargs(config, use_gpu=False)) == {}


class _Steps:
    """vLLM's LLMEngine as VllmEngine uses it: requests added, steps until none is unfinished."""

    def __init__(self) -> None:
        self.added: list[tuple[str, dict, object]] = []
        self.unfinished: list[str] = []
        self.batches: list[int] = []

    def add_request(self, rid, prompt, params) -> None:
        self.added.append((rid, prompt, params))
        self.unfinished.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.unfinished)

    def step(self) -> list:
        self.batches.append(len(self.unfinished))  # max_tokens=1: every request finishes in one step
        self.unfinished.clear()
        return []


def test_prepare_compiles_the_logprob_kernels_once_at_batch_sizes_one_two_three() -> None:
    """--logprobs: before the first real request the engine samples one token with log-probabilities at
    batch sizes 1, 2 and 3 (vLLM torch.compiles its rank kernel on first use; outside vLLM's settings
    torch recompiles for another size),
    once per engine; a run without log-probabilities sends nothing."""
    from flamingo_cli.engine import VllmEngine
    from flamingo_cli.records import Sampling

    engine = VllmEngine.__new__(VllmEngine)
    engine._engine, engine._logprobs_ready = _Steps(), False
    engine.prepare(Sampling(logprobs=False))
    assert engine._engine.added == [] and engine._logprobs_ready is False
    engine.prepare(Sampling(logprobs=True))
    assert engine._engine.batches == [1, 2, 3]
    assert len({rid for rid, _, _ in engine._engine.added}) == 6
    for _, prompt, params in engine._engine.added:
        assert "multi_modal_data" not in prompt and prompt["prompt_token_ids"]
        assert params.logprobs == 0 and params.max_tokens == 1 and params.temperature == 0.0
        assert params.detokenize is False
    engine.prepare(Sampling(logprobs=True))
    assert len(engine._engine.added) == 6 and engine._logprobs_ready is True


def _bare_engine(mm_kwargs: dict) -> VllmEngine:
    engine = VllmEngine.__new__(VllmEngine)
    engine.config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0)
    engine._engine, engine._mm_kwargs, engine._counter = _Steps(), mm_kwargs, 0
    engine._prepared, engine._logprobs_ready = False, False
    engine.defaults = {}
    return engine


def test_audio_requests_carry_the_mel_device_and_text_requests_do_not():
    import numpy as np

    from flamingo_cli.records import AudioItem, Chunk, Request, Sampling

    engine = _bare_engine({"device": "cuda"})
    item = AudioItem(id="a.wav", path="a.wav")
    span = {"item": item, "num_chunks": 1, "start_s": 0.0, "end_s": 1.0, "duration_s": 1.0}
    audio = Chunk(index=0, samples=np.zeros(16000, np.float32), **span)
    track = Chunk(index=-1, samples=None, **span)
    engine._add(Request(chunk=audio, prompt="Say.", text="<sound> Say."), Sampling(max_tokens=4))
    engine._add(Request(chunk=track, prompt="Sum up.", text="Sum up."), Sampling(max_tokens=4))
    (_, with_audio, _), (_, text_only, _) = engine._engine.added
    assert with_audio["mm_processor_kwargs"] == {"device": "cuda"} and "multi_modal_data" in with_audio
    assert "mm_processor_kwargs" not in text_only and "multi_modal_data" not in text_only


def test_prepare_warms_the_engine_once_and_the_logprob_kernels_when_asked(monkeypatch):
    """The first prepare(): the GPU log-mel's CUDA start and one one-token request (vLLM's first step
    JIT-compiles kernels); a later one with log-probabilities adds batch sizes 1, 2, 3 with them; then
    nothing more."""
    from flamingo_cli.records import Sampling

    engine = _bare_engine({"device": "cuda"})
    mel = []
    monkeypatch.setattr(VllmEngine, "_warm_mel", lambda self: mel.append(self._mm_kwargs["device"]))
    engine.prepare(Sampling())
    assert mel == ["cuda"] and engine._engine.batches == [1] and engine._prepared is True
    ((_, prompt, params),) = engine._engine.added
    assert prompt == {"prompt_token_ids": [0, 1]} and params.max_tokens == 1 and params.logprobs is None
    engine.prepare(Sampling())  # nothing more for the same engine
    assert engine._engine.batches == [1]
    engine.prepare(Sampling(logprobs=True))
    assert engine._engine.batches == [1, 1, 2, 3] and mel == ["cuda"] and engine._logprobs_ready is True
    assert all(params.logprobs == 0 for _, _, params in engine._engine.added[1:])
    assert len({rid for rid, _, _ in engine._engine.added}) == 7
    engine.prepare(Sampling(logprobs=True))
    assert len(engine._engine.added) == 7


def test_a_start_whose_forked_engine_process_could_not_use_cuda_is_retried_with_spawn(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    log = tmp_path / "engine.log"
    log.write_text(f"(EngineCore pid=1) RuntimeError: {FORKED_CUDA}. To use CUDA with multiprocessing, ...\n")
    assert forked_cuda_failed("RuntimeError: Engine core initialization failed. See root cause above.", log)
    assert not forked_cuda_failed("RuntimeError: Engine core initialization failed.", tmp_path / "none.log")
    methods: list[str | None] = []
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(get_diff_sampling_param=dict)))

    def start(kwargs):
        methods.append(os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"))
        if len(methods) == 1:
            return None, f"RuntimeError: {FORKED_CUDA}"
        return llm, None

    monkeypatch.setattr(VllmEngine, "_start", staticmethod(start))
    engine = VllmEngine(EngineConfig(model="m", family=AF3, max_chunk_s=30.0, verbose=True))
    assert methods == [None, "spawn"] and engine.llm is llm
    # spawn already tried: the failure is the run's (exit 3), no second retry
    assert not forked_cuda_failed(f"RuntimeError: {FORKED_CUDA}")
    methods.clear()
    monkeypatch.setattr(VllmEngine, "_start", staticmethod(lambda kwargs: (methods.append(1), (None, "OSError: x"))[1]))
    with pytest.raises(Exception, match="could not load m: OSError: x"):
        VllmEngine(EngineConfig(model="m", family=AF3, max_chunk_s=30.0, verbose=True))
    assert methods == [1]


@pytest.mark.engine
def test_the_per_request_processor_kwargs_reach_the_processor_and_change_nothing(tiny_af3):
    """The real engine takes the log-mel device with each request (here the CPU, named explicitly) and
    gives the same tokens as without it."""
    from conftest import cli_engine

    from flamingo_cli.models import family_for
    from flamingo_cli.parity import Case, make_chunks, run_vllm
    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    engine = cli_engine(tiny_af3)
    builder = PromptBuilder(family_for(str(tiny_af3)), load_chat_template(str(tiny_af3)))
    pairs = make_chunks([Case("a", 3.0, "Describe the audio.", seed=1), Case("b", 7.5, "Say.", seed=2)], 600.0)
    before = getattr(engine, "_mm_kwargs", {})
    try:
        engine._mm_kwargs = {}
        plain = run_vllm(engine, builder, pairs, 6)
        engine._mm_kwargs = {"device": "cpu"}
        named = run_vllm(engine, builder, pairs, 6)
    finally:
        engine._mm_kwargs = before
    assert len(plain) == 2 and {k: r.token_ids for k, r in plain.items()} == {k: r.token_ids for k, r in named.items()}
    assert all(len(r.token_ids) == 6 for r in plain.values())
    # the real engine's batch cap sets what flamingo keeps in flight: vLLM's CPU default 256, and 64 more
    assert engine.in_flight == in_flight_cap(None, engine._engine.vllm_config.scheduler_config.max_num_seqs) == 320


class _Batches:
    """vLLM's LLMEngine as ``VllmEngine.run`` feeds it: each request finishes on the third step after it
    was added; the most requests it ever held at once is ``peak``."""

    def __init__(self) -> None:
        self.age: dict[str, int] = {}
        self.peak = 0

    def add_request(self, rid, prompt, params) -> None:
        self.age[rid] = 0
        self.peak = max(self.peak, len(self.age))

    def has_unfinished_requests(self) -> bool:
        return bool(self.age)

    def step(self) -> list:
        outputs = []
        for rid in list(self.age):
            self.age[rid] += 1
            if self.age[rid] == 3:
                del self.age[rid]
                done = SimpleNamespace(token_ids=[7], finish_reason="length", stop_reason=None, logprobs=None)
                outputs.append(SimpleNamespace(request_id=rid, outputs=[done], finished=True, prompt_token_ids=[1]))
        return outputs


@pytest.mark.parametrize(
    ("max_in_flight", "max_num_seqs", "cap"), [(None, 8, 10), (None, 1024, 1280), (None, None, 320), (5, 8, 5)]
)
def test_requests_in_flight_follow_the_engines_batch_cap(max_in_flight, max_num_seqs, cap):
    """flamingo keeps vLLM's batch cap (max_num_seqs) in flight and a quarter more waiting, unless
    told otherwise: a smaller fixed cap left vLLM's batch short (a 664-clip corpus ran as 512, then 152)."""
    import queue

    import numpy as np

    from flamingo_cli.engine import END
    from flamingo_cli.records import AudioItem, Chunk, Request, Sampling

    assert in_flight_cap(max_in_flight, max_num_seqs) == cap
    config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0, max_in_flight=max_in_flight)
    engine = VllmEngine.__new__(VllmEngine)
    engine.config, engine._engine, engine._prepared, engine._counter = config, _Batches(), True, 0
    engine._pending, engine._started, engine._drop, engine._mm_kwargs = {}, set(), False, None
    engine.in_flight = in_flight_cap(config.max_in_flight, max_num_seqs)
    engine._decode = lambda ids, skip_special_tokens: "x" * len(ids)
    engine._close_ids, engine.defaults = (), {}
    feed: queue.Queue = queue.Queue()
    n = 3 * cap + 1
    for i in range(n):
        item = AudioItem(id=f"a{i}", path=f"a{i}.wav")
        chunk = Chunk(
            item=item,
            index=0,
            num_chunks=1,
            start_s=0.0,
            end_s=1.0,
            samples=np.zeros(16000, np.float32),
            duration_s=1.0,
        )
        feed.put(Request(chunk=chunk, prompt="p", text="<sound>p"))
    feed.put(END)
    results = list(engine.run(feed, Sampling(temperature=0.0, max_tokens=1)))
    assert sorted(r.chunk.item.id for r in results) == sorted(f"a{i}" for i in range(n))
    assert engine._engine.peak == cap  # filled to the cap, never past it


def test_the_model_runner_reaches_vllm_through_its_environment_variable():
    """--model-runner v1/v2 is VLLM_USE_V2_MODEL_RUNNER in the engine's environment (vLLM reads it in
    its front-end and engine processes); auto is flamingo's choice: V1 on the CPU (V2 runs Triton)."""
    from flamingo_cli.engine_options import EngineOptionError
    from flamingo_cli.vllm_args import engine_env, model_runner

    def runner(value: str, use_gpu: bool) -> str:
        config = EngineConfig(model="m", family=AF3, max_chunk_s=30.0, model_runner=value)
        assert engine_env(config, use_gpu)["VLLM_USE_V2_MODEL_RUNNER"] == (
            "1" if model_runner(config, use_gpu) == "v2" else "0"
        )
        return model_runner(config, use_gpu)

    assert runner("v1", True) == "v1" and runner("v2", True) == "v2"
    assert runner("auto", False) == "v1"
    with pytest.raises(EngineOptionError, match="--model-runner v2 needs a CUDA GPU"):
        EngineConfig(model="m", family=AF3, max_chunk_s=30.0, model_runner="v2").check(use_gpu=False)
