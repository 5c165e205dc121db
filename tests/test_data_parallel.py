"""Data parallel replicas (flamingo_cli/data_parallel.py): device planning, dispatch, failures.

The replica processes are real (spawned, fed over multiprocessing queues); the engine inside them is
``EchoEngine`` below, named by factory path, so these run in seconds. The real vLLM engine behind the
same replicas is covered by tests/test_cli_e2e.py::test_replicas_match_one_engine.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from flamingo_cli.data_parallel import DataParallelEngine, replica_devices
from flamingo_cli.engine import END, EngineConfig, EngineError, Sampling
from flamingo_cli.models import family_for
from flamingo_cli.records import AudioItem, Chunk, Request, Result

FACTORY = f"{__name__}:EchoEngine"


class EchoEngine:
    """Runs in a replica process: answers ``<id>#<chunk>@<pid>``; ``config.extra`` injects faults."""

    def __init__(self, config: EngineConfig) -> None:
        if config.extra.get("fail_start"):
            raise RuntimeError("no GPU memory left (injected)")
        self.config = config
        self.versions = {"vllm": "echo"}
        self.defaults = SimpleNamespace(temperature=0.7, top_p=0.9, top_k=-1, repetition_penalty=1.0)
        self.results = 0
        self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES")

    def run(self, feed: queue.Queue, sampling: Sampling, on_step=None):
        while True:
            request = feed.get()
            if request is END:
                return
            time.sleep(self.config.extra.get("delay", 0.0))
            self.results += 1
            die_after = self.config.extra.get("die_after")
            if die_after is not None and self.results > die_after:
                os._exit(7)
            chunk = request.chunk
            yield Result(
                chunk=chunk,
                prompt=request.prompt,
                caption=f"{chunk.item.id}#{chunk.index}@{os.getpid()}:{self.gpus}:{float(chunk.samples.sum()):.1f}",
                finish_reason="stop",
                prompt_tokens=3,
                output_tokens=1,
                token_ids=[1, 2],
            )

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchEchoEngine(EchoEngine):
    """An engine that loads torch when built, as vLLM does: answers with the replica's torch threads."""

    def __init__(self, config: EngineConfig) -> None:
        import torch  # noqa: F401

        super().__init__(config)

    def run(self, feed: queue.Queue, sampling: Sampling, on_step=None):
        import torch

        for result in super().run(feed, sampling, on_step):
            result.caption = str(torch.get_num_threads())
            yield result


class StartLogEngine(EchoEngine):
    """Logs (device, memory budget, start, ready) to ``extra["log"]``; slow to start; fails on the
    device named by ``extra["fail_on"]``: what replicas sharing a GPU must be started around."""

    def __init__(self, config: EngineConfig) -> None:
        dev = os.environ.get("CUDA_VISIBLE_DEVICES")
        t0 = time.time()
        time.sleep(config.extra.get("start_delay", 0.0))
        if dev == config.extra.get("fail_on"):
            raise RuntimeError(f"CUDA out of memory on {dev} (injected)")
        with open(config.extra["log"], "a") as fh:
            fh.write(json.dumps([dev, config.gpu_memory_utilization, t0, time.time(), os.getpid()]) + "\n")
        super().__init__(replace(config, extra={}))


def _config(**extra) -> EngineConfig:
    return EngineConfig(model="echo", family=family_for("af3"), max_chunk_s=600.0, max_in_flight=4, extra=extra)


def _requests(n: int) -> list[Request]:
    out = []
    for i in range(n):
        item = AudioItem(id=f"item{i}", path=f"/a/{i}.wav")
        samples = np.full(1600, i, dtype=np.float32)
        chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0.0, end_s=0.1, samples=samples, duration_s=0.1)
        out.append(Request(chunk=chunk, prompt="p", text="t"))
    return out


def _feed(requests: list[Request]) -> queue.Queue:
    feed: queue.Queue = queue.Queue()
    for r in requests:
        feed.put(r)
    feed.put(END)
    return feed


# --- device planning ------------------------------------------------------------------------------------


def test_plan_replicas_from_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert replica_devices("all") == ["4", "5", "6", "7"]
    assert replica_devices(None, tensor_parallel_size=2) == ["4,5", "6,7"]
    assert replica_devices("1,3") == ["5", "7"]  # indexes into the visible GPUs, as CUDA numbers them
    assert replica_devices("all", replicas=2) == ["4", "5"]
    assert replica_devices("0,1,2", tensor_parallel_size=2) == ["4,5"]  # a leftover GPU stays idle
    assert replica_devices("none") == [None]
    assert replica_devices("none", replicas=3) == [None, None, None]
    # more replicas than GPU groups: a multiple of them, so many replicas on each group
    assert replica_devices("all", replicas=8) == ["4", "5", "6", "7", "4", "5", "6", "7"]
    assert replica_devices("0", replicas=2) == ["4", "4"]
    assert replica_devices(None, tensor_parallel_size=2, replicas=4) == ["4,5", "6,7", "4,5", "6,7"]
    with pytest.raises(ValueError, match=r"--replicas 6 with 4 GPU group\(s\): .*multiple .*\(8 = 2 per group\)"):
        replica_devices("all", replicas=6)
    for bad, kw in [("9", {}), ("0,0", {}), ("x", {}), ("all", {"replicas": 5}), ("0", {"tensor_parallel_size": 2})]:
        with pytest.raises(ValueError):
            replica_devices(bad, **kw)


def test_plan_replicas_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert replica_devices("all") == [None]
    assert replica_devices("all", replicas=2) == [None, None]
    with pytest.raises(ValueError) as info:
        replica_devices("0")
    assert str(info.value).startswith("--gpus '0': no GPUs visible on this host (asked for 0)")
    assert "0..-1" not in str(info.value)


def test_plan_replicas_index_beyond_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with pytest.raises(ValueError) as info:
        replica_devices("1,2")
    assert str(info.value) == "--gpus '1,2': this host has 2 visible GPUs (GPUs 0..1); asked for 1,2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"has 1 visible GPU \(GPU 0\); asked for 1$"):
        replica_devices("1")


def test_replicas_cap_torch_threads() -> None:
    """EngineConfig.replica_threads reaches torch in every replica; None leaves torch's own default."""
    factory = f"{__name__}:TorchEchoEngine"
    engine = DataParallelEngine(replace(_config(), replica_threads=1), [None, None], factory=factory)
    try:
        assert {r.caption for r in engine.run(_feed(_requests(6)), Sampling())} == {"1"}
    finally:
        engine.close()
    # What a fresh interpreter picks here (this test process's own count may have been changed).
    probe = "import torch; print(torch.get_num_threads())"
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    engine = DataParallelEngine(_config(), [None], factory=factory)
    try:
        assert {r.caption for r in engine.run(_feed(_requests(2)), Sampling())} == {default}
    finally:
        engine.close()


# --- dispatch -----------------------------------------------------------------------------------------------


def test_every_request_comes_back_once_from_some_replica() -> None:
    engine = DataParallelEngine(_config(delay=0.002), ["0", "1", None], factory=FACTORY)
    try:
        assert engine.versions == {"vllm": "echo"}
        assert engine.effective_sampling(Sampling(temperature=0.0, max_tokens=9))["top_p"] == 0.9
        requests = _requests(60)
        results = list(engine.run(_feed(requests), Sampling()))
        assert sorted(r.chunk.item.id for r in results) == sorted(r.chunk.item.id for r in requests)
        by_id = {r.chunk.item.id: r for r in requests}
        for res in results:
            # the parent's own chunk comes back (with its audio), not a copy from the replica
            assert res.chunk is by_id[res.chunk.item.id].chunk
            name, _, rest = res.caption.partition("@")
            pid, _gpus, total = rest.split(":")
            assert name == f"{res.chunk.item.id}#0"
            assert float(total) == pytest.approx(float(res.chunk.samples.sum()))  # the audio travelled
            assert int(pid) in engine.pids
            assert res.token_ids == [1, 2] and res.prompt_tokens == 3
        used = {r.caption.split("@")[1].split(":")[0] for r in results}
        assert len(used) == 3  # every replica got work
        gpus_seen = {r.caption.split(":")[1] for r in results}
        assert gpus_seen == {"0", "1", "None"}  # each replica saw only its own CUDA_VISIBLE_DEVICES
        assert engine.peak_in_flight <= 3 * 4  # replicas x max_in_flight bounds what the parent sends
        # A second run on the same replicas (the engine cache reuses them across commands).
        again = list(engine.run(_feed(_requests(5)), Sampling()))
        assert len(again) == 5
    finally:
        engine.close()
    assert all(not p.is_alive() for p in engine._procs)


def test_a_slow_replica_gets_less_work() -> None:
    engine = DataParallelEngine(_config(delay=0.02), [None, None], factory=FACTORY)
    try:
        results = list(engine.run(_feed(_requests(40)), Sampling()))
        per_pid: dict[str, int] = {}
        for r in results:
            pid = r.caption.split("@")[1].split(":")[0]
            per_pid[pid] = per_pid.get(pid, 0) + 1
        assert len(results) == 40 and len(per_pid) == 2
        assert min(per_pid.values()) >= 10  # least-loaded dispatch spreads an even load evenly
    finally:
        engine.close()


def test_a_replica_that_cannot_start_is_a_clear_engine_error() -> None:
    with pytest.raises(EngineError, match=r"replica 0 \(GPU 3\).*no GPU memory left"):
        DataParallelEngine(_config(fail_start=True), ["3", None], factory=FACTORY)


def test_replicas_sharing_a_gpu_split_its_memory_and_start_one_after_another(tmp_path) -> None:
    """Two replicas on GPU "a", one on "b": each on "a" gets half the memory budget and the second
    starts only once the first is up (vLLM sizes its KV cache from a memory profile that a neighbour
    starting at the same time would disturb); "b" starts at once; work reaches all three."""
    log = tmp_path / "starts.jsonl"
    factory = f"{__name__}:StartLogEngine"
    config = replace(_config(start_delay=1.0, log=str(log)), gpu_memory_utilization=0.9)
    engine = DataParallelEngine(config, ["a", "b", "a"], factory=factory)
    try:
        results = list(engine.run(_feed(_requests(30)), Sampling()))
        assert len(results) == 30
        assert {r.caption.split(":")[1] for r in results} == {"a", "b"}
        assert len({r.caption.split("@")[1].split(":")[0] for r in results}) == 3
    finally:
        engine.close()
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    on_a = sorted((s for s in starts if s[0] == "a"), key=lambda s: s[2])
    on_b = [s for s in starts if s[0] == "b"]
    assert [s[1] for s in on_a] == [pytest.approx(0.45), pytest.approx(0.45)] and on_b[0][1] == pytest.approx(0.9)
    assert on_a[1][2] >= on_a[0][3]  # the second on "a" began after the first was ready
    assert on_b[0][2] < on_a[0][3]  # "b" did not wait for "a"


def test_a_failed_replica_holds_back_the_next_on_its_gpu(tmp_path) -> None:
    factory = f"{__name__}:StartLogEngine"
    config = _config(log=str(tmp_path / "starts.jsonl"), fail_on="a")
    with pytest.raises(EngineError) as err:
        DataParallelEngine(config, ["a", "b", "a"], factory=factory)
    message = str(err.value)
    assert "replica 0 (GPU a): RuntimeError: CUDA out of memory on a" in message
    assert "replica 2 (GPU a): not started (a replica before it on this GPU failed)" in message
    started = [json.loads(line)[0] for line in (tmp_path / "starts.jsonl").read_text().splitlines()]
    assert started == ["b"]  # the other GPU's replica came up and was closed with the rest


def test_a_replica_dying_mid_run_ends_the_run_with_engine_error() -> None:
    engine = DataParallelEngine(_config(delay=0.01, die_after=3), [None, None], factory=FACTORY)
    got: list[Result] = []
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="died"):
        for res in engine.run(_feed(_requests(40)), Sampling()):
            got.append(res)
    assert time.monotonic() - t0 < 30
    assert len(got) <= 6  # what finished before the death still came out (and is written by the sink)
    assert engine.llm is None and all(not p.is_alive() for p in engine._procs)  # closed, nothing left running
    with pytest.raises(EngineError, match="closed"):
        list(engine.run(_feed([]), Sampling()))
