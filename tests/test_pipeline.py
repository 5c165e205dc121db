"""The streaming pipeline (flamingo_cli/pipeline.py): what the engine receives and how much is held."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
from conftest import make_audio, read_rows

from flamingo_cli.audio import decode
from flamingo_cli.engine import END, Sampling
from flamingo_cli.models import AF3
from flamingo_cli.pipeline import CaptionJob, _Feed, run_pipeline
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import AudioItem, Chunk, Request, Result
from flamingo_cli.sink import Sink
from flamingo_cli.sources import iter_items


class Recorder:
    """Keeps every request it is given and answers at once."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def effective_sampling(self, sampling: Sampling) -> dict:
        return sampling.identity()

    def run(self, feed: queue.Queue, sampling: Sampling, on_step=None):
        while (request := feed.get()) is not END:
            self.requests.append(request)
            yield Result(chunk=request.chunk, prompt=request.prompt, caption="ok", finish_reason="stop")

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_chunks_of_a_long_item_own_their_samples(tmp_path: Path) -> None:
    """A chunk in flight must not keep its whole track alive: each of several chunks is its own array."""
    make_audio(tmp_path / "in" / "long.flac", 45.0, 22050, 2, seed=1)
    make_audio(tmp_path / "in" / "short.wav", 3.0, seed=2)
    job = CaptionJob([], PromptBuilder(AF3), "Describe.", 600.0, Sampling(max_tokens=8), chunk_s=20.0)
    engine = Recorder()
    with Sink(tmp_path / "out", "abcdef123456", {}, model="m", task="t") as sink:
        run_pipeline(job, iter_items([tmp_path / "in"]), engine, sink, index=sink.load_index())
    assert len(read_rows(tmp_path / "out")) == 4

    by_key = {r.chunk.key: r.chunk for r in engine.requests}
    whole = decode(AudioItem(id="long.flac", path=str(tmp_path / "in" / "long.flac"))).samples
    long_chunks = [by_key[("long.flac", i)] for i in range(3)]
    for chunk in long_chunks:
        assert chunk.samples.base is None and chunk.samples.flags.owndata  # a copy, not a view
        s = round(chunk.start_s * 16000)
        np.testing.assert_array_equal(chunk.samples, whole[s : s + len(chunk.samples)])
    assert [len(c.samples) for c in long_chunks] == [320000, 320000, 80000]
    assert len(by_key[("short.wav", 0)].samples) == 48000  # one chunk: the decoded array itself


def _request(seconds: float) -> Request:
    item = AudioItem(id=f"x{seconds}", path="/x.wav")
    chunk = Chunk(
        item=item,
        index=0,
        num_chunks=1,
        start_s=0.0,
        end_s=seconds,
        samples=np.zeros(1, np.float32),
        duration_s=seconds,
    )
    return Request(chunk=chunk, prompt="p", text="t")


def test_feed_is_bounded_by_seconds_of_audio_as_well_as_count() -> None:
    feed = _Feed(maxsize=10, max_audio_s=1000.0)
    feed.put(_request(600.0))
    feed.put(_request(600.0))  # one request always fits; now over the budget
    with pytest.raises(queue.Full):
        feed.put(_request(1.0), timeout=0.01)
    feed.get()
    feed.put(_request(1.0), timeout=0.01)  # 601 s queued: room again
    assert feed.qsize() == 2 and feed.audio_s == pytest.approx(601.0)
    for _ in range(8):
        feed.put(_request(1.0), timeout=0.01)
    with pytest.raises(queue.Full):  # and by count
        feed.put(_request(1.0), timeout=0.01)
    while not feed.empty():
        feed.get()
    assert feed.audio_s == pytest.approx(0.0)


# --- several tasks, one pass (issue 26 part 3) --------------------------------------------------------

_VOLATILE = {"created_at", "source_mtime_ns"}


def _two_task_corpus(root: Path) -> Path:
    make_audio(root / "long.wav", 25.0, seed=1)  # three chunks of 10 s and a track row
    make_audio(root / "short.wav", 3.0, seed=2)
    (root / "copy.wav").write_bytes((root / "short.wav").read_bytes())  # a duplicate: each task copies its own answer
    return root


def _by_run(out: Path) -> dict[str, list[dict]]:
    from flamingo_cli.output.layout import read_output

    runs: dict[str, list[dict]] = {}
    for row in read_output(out).to_pylist():
        runs.setdefault(row["run"], []).append({k: v for k, v in row.items() if k not in _VOLATILE})
    return {k: sorted(v, key=lambda r: (r["id"], r["chunk_index"])) for k, v in runs.items()}


def _by_prompt(request: Request) -> str:
    """A caption that tells the tasks apart (the fake's default names only the chunk)."""
    kind = "track" if request.chunk.samples is None else "chunk"
    return f"{kind}:{request.prompt[:12]}:{request.chunk.item.id}#{request.chunk.index}"


def test_two_tasks_in_one_pass_write_the_rows_of_two_runs_decoding_each_file_once(
    tmp_path: Path, fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import run_cli

    import flamingo_cli.prepare

    corpus = _two_task_corpus(tmp_path / "in")
    decoded: list[str] = []

    def counted(item: AudioItem):
        decoded.append(Path(item.path).name)
        return decode(item)

    monkeypatch.setattr(flamingo_cli.prepare, "decode", counted)
    fake.caption = _by_prompt
    base = [str(corpus), "--chunk-seconds", "10", "--summary-json"]
    tasks = ["-t", "caption", "-t", "transcribe"]
    both = run_cli(["caption", *base, tmp_path / "s.json", "-o", tmp_path / "both", *tasks])
    assert both.status == 0, both.stderr
    assert sorted(decoded) == ["copy.wav", "long.wav", "short.wav"]  # once each, for both tasks
    # each chunk asked every task, back to back
    audio = [key for key in fake.requests if key[1] >= 0]
    assert len(audio) == 8 and audio[0::2] == audio[1::2]  # copy.wav's and long.wav's 3 (short.wav: a duplicate)
    one = {}
    for task in ("caption", "transcribe"):
        result = run_cli(["caption", *base, tmp_path / f"{task}.json", "-o", tmp_path / task, "-t", task])
        assert result.status == 0, result.stderr
        one.update(_by_run(tmp_path / task))
    together = _by_run(tmp_path / "both")
    assert set(together) == set(one) and len(one) == 2  # the run key each one-task run gets
    for key, rows in one.items():
        assert together[key] == rows
    second = [r for rows in one.values() for r in rows if r["id"] == "long.wav" and r["chunk_index"] == 1]
    captions = {r["task"]: r["caption"] for r in second}
    assert captions["caption"] != captions["transcribe"]  # each task's own prompt
    assert {r["gate"] for rows in together.values() for r in rows if r["id"] == "short.wav"} == {"duplicate"}
    import json

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["task"] == "caption+transcribe"
    assert {t["task"]: t["rows_written"] for t in summary["tasks"]} == {"caption": 6, "transcribe": 6}


def test_two_tasks_resume_asks_only_the_task_left(tmp_path: Path, fake) -> None:
    from conftest import run_cli

    corpus = _two_task_corpus(tmp_path / "in")
    out = tmp_path / "out"
    base = ["caption", corpus, "-o", out, "--chunk-seconds", "10"]
    assert run_cli([*base, "-t", "caption"]).status == 0
    fake.requests.clear()
    fake.caption = _by_prompt
    assert run_cli([*base, "-t", "caption", "-t", "transcribe"]).status == 0
    rows = read_rows(out)
    asked = {r["prompt"] for r in rows if r["caption"] and r["caption"].startswith(("chunk:", "track:"))}
    assert asked and all("ranscribe" in p or "transcript" in p for p in asked)  # only the transcribe task
    assert len(fake.requests) == 5  # long: 3 chunks + its track; short; copy is short's duplicate
    fake.requests.clear()
    again = run_cli([*base, "-t", "caption", "-t", "transcribe"])
    assert again.status == 0 and fake.requests == [] and "nothing to do" in again.stderr


def test_several_tasks_are_refused_where_they_cannot_share_one_pass(tmp_path: Path) -> None:
    from flamingo_cli.spec import CaptionSpec, SpecError

    corpus = _two_task_corpus(tmp_path / "in")
    with pytest.raises(SpecError, match="different models"):
        CaptionSpec.build([corpus], tmp_path / "o", tasks=["caption", "describe-music"])
    with pytest.raises(SpecError, match="not --executor ray"):
        CaptionSpec.build([corpus], tmp_path / "o", tasks=["caption", "transcribe"], executor="ray")
    with pytest.raises(SpecError, match="the same task"):
        preset_file = Path(__file__).parents[1] / "configs" / "caption.toml"
        CaptionSpec.build([corpus], tmp_path / "o", tasks=["caption", str(preset_file)])
    with pytest.raises(SpecError, match="--prompt with several tasks"):
        CaptionSpec.build([corpus], tmp_path / "o", tasks=["caption", "transcribe"], prompt="x")
    spec = CaptionSpec.build([corpus], tmp_path / "o", tasks=["caption", "transcribe"])
    alone = CaptionSpec.build([corpus], tmp_path / "o", task="transcribe")
    assert [t.run_key for t in spec.tasks][1] == alone.run_key
    assert spec.run_key == CaptionSpec.build([corpus], tmp_path / "o").run_key
    assert spec.engine_config().mm_cache_gb > 0 and alone.engine_config().mm_cache_gb == 0
    from conftest import run_cli

    refused = run_cli(["caption", corpus, "-o", tmp_path / "o", "-t", "caption", "-t", "describe-music"])
    assert refused.status == 2 and "different models" in refused.stderr and not (tmp_path / "o").exists()


@pytest.mark.engine
def test_two_tasks_in_one_pass_through_the_real_engine(tiny_af3: Path, tmp_path: Path) -> None:
    """The tiny AF3 checkpoint on vLLM's CPU engine (the one the CLI tests share): two tasks in one pass
    write, per run key, the greedy rows the two one-task runs write."""
    from conftest import ENGINE_ARGS, cli_engine, run_cli

    make_audio(tmp_path / "in" / "a.wav", 2.0, seed=1)
    make_audio(tmp_path / "in" / "b.wav", 3.0, seed=2)
    engine = cli_engine(tiny_af3)
    base = ["caption", tmp_path / "in", "--model", tiny_af3, *ENGINE_ARGS]
    both = run_cli([*base, "-o", tmp_path / "both", "-t", "caption", "-t", "transcribe"], engine=engine)
    assert both.status == 0, both.stderr
    one: dict[str, list[dict]] = {}
    for task in ("caption", "transcribe"):
        assert run_cli([*base, "-o", tmp_path / task, "-t", task], engine=engine).status == 0
        one.update(_by_run(tmp_path / task))
    together = _by_run(tmp_path / "both")
    assert set(together) == set(one) and len(one) == 2
    for key, rows in one.items():
        assert [(r["id"], r["task"], r["prompt"], r["caption"]) for r in together[key]] == [
            (r["id"], r["task"], r["prompt"], r["caption"]) for r in rows
        ]
        assert len(rows) == 2 and all(r["error"] is None and r["caption"] for r in rows)
