"""Flags on every row and --fallback's temperature ladder (flamingo_cli/fallback.py), through the real CLI
over the fake engine (tests/fakes.py): looping items, re-asks, the kept attempt, exactly once, resume."""

from __future__ import annotations

import json
import queue
import zlib
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_audio, read_rows, run_cli
from fakes import LOOP, FakeEngine

from flamingo_cli.engine import END
from flamingo_cli.fallback import FallbackPolicy, Ladder, RetryFeed, parse_temperatures
from flamingo_cli.records import AudioItem, Chunk, Request
from flamingo_cli.spec import CaptionSpec, SpecError

ARGS = ["--model", "af3", "--max-tokens", "12", "--quiet", "--logprobs"]


def corpus(root: Path) -> Path:
    for i, name in enumerate(("a.wav", "b.wav", "c.wav")):
        make_audio(root / name, 2.0, seed=i)
    return root


def caption(inputs: Path, out: Path, *extra: object) -> tuple[int, dict, dict[str, dict]]:
    summary = out.parent / f"{out.name}.summary.json"
    res = run_cli(["caption", inputs, "--out", out, *ARGS, "--summary-json", summary, *extra])
    rows = read_rows(out)
    return res.status, json.loads(summary.read_text()), {r["id"]: r for r in rows}


def test_every_row_is_judged_without_fallback(tmp_path: Path, fake: FakeEngine) -> None:
    fake.loop = {"a.wav": float("inf")}
    fake.fail_ids = {"c.wav"}
    status, doc, rows = caption(corpus(tmp_path / "in"), tmp_path / "out")
    assert status == 1  # c.wav's engine error
    a, b, c = rows["a.wav"], rows["b.wav"], rows["c.wav"]
    assert a["caption"] == LOOP and a["flags"] == ["repetition", "truncated"] and a["attempts"] == 1
    assert a["compression_ratio"] > 2.4 and a["avg_logprob"] == pytest.approx(-0.9)
    assert b["flags"] == [] and b["avg_logprob"] == pytest.approx(-0.25) and b["attempts"] == 1
    assert b["compression_ratio"] == pytest.approx(len(b["caption"]) / len(zlib.compress(b["caption"].encode())))
    assert c["error"] and c["flags"] is None and c["avg_logprob"] is None and c["attempts"] == 1
    assert doc["rows_flagged"] == 1 and doc["flags"]["repetition"] == 1 and doc["flags"]["truncated"] == 1
    assert doc["flags"]["low_confidence"] == 0 and doc["fallback"] == {"chunks": 0, "attempts": 0, "recovered": 0}
    assert len(fake.requests) == 3  # nobody asked twice

    # --no-logprobs (the default: they cost ~20 % of throughput on the GPU, BENCHMARKS.md): no
    # avg_logprob, so no low_confidence; the run key stays the same
    fake.logprob = -3.0
    status, _, rows2 = caption(tmp_path / "in", tmp_path / "out2", "--no-logprobs")
    assert rows2["b.wav"]["avg_logprob"] is None and rows2["b.wav"]["flags"] == []
    assert rows2["b.wav"]["run"] == b["run"]
    res = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "out3", "--model", "af3", "--quiet"])
    assert res.status == 1 and read_rows(tmp_path / "out3")[0]["avg_logprob"] is None  # off unless asked


def test_fallback_climbs_the_ladder_and_keeps_the_best(tmp_path: Path, fake: FakeEngine) -> None:
    fake.loop = {"a.wav": 0.5, "b.wav": float("inf")}  # a stops looping at 0.6; b never does
    fake.batch = 4  # every first ask (and the feed's end) taken before any answer: re-asks come later
    inputs = corpus(tmp_path / "in")
    status, doc, rows = caption(inputs, tmp_path / "out", "--temperature", "0", "--fallback")
    assert status == 0
    assert len(read_rows(tmp_path / "out")) == 3  # exactly one row per chunk, none for the attempts between
    a, b, c = rows["a.wav"], rows["b.wav"], rows["c.wav"]
    # a: 0.0, 0.2, 0.4 loop, 0.6 is clean and kept
    assert a["attempts"] == 4 and a["flags"] == [] and a["caption"].startswith("fake:a.wav#0 t=0.6 seed=")
    # b: the whole ladder; every attempt loops: the best avg_logprob (the fake's peak at 0.4) is kept
    assert b["attempts"] == 6 and b["caption"] == LOOP and b["avg_logprob"] == pytest.approx(-0.5)
    assert b["flags"] == ["repetition", "truncated"]
    assert c["attempts"] == 1 and c["caption"] == "fake:c.wav#0"
    asked = Counter((i, attempt) for i, _, attempt, _, _ in fake.asked)
    assert sorted(t for i, _, _, t, _ in fake.asked if i == "b.wav") == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(n == 1 for n in asked.values())  # each attempt asked once
    assert doc["fallback"] == {"chunks": 2, "attempts": 8, "recovered": 1}
    assert doc["rows_flagged"] == 1 and doc["chunks_ok"] == 3

    # deterministic: the same seed gives the same rows; another seed other re-ask samples
    first = [(i, t, s) for i, _, _, t, s in fake.asked]
    fake.asked.clear()
    _, _, again = caption(inputs, tmp_path / "again", "--temperature", "0", "--fallback")
    assert sorted((i, t, s) for i, _, _, t, s in fake.asked) == sorted(first)  # (order: batching's)
    assert {k: (r["caption"], r["attempts"]) for k, r in again.items()} == {
        k: (r["caption"], r["attempts"]) for k, r in rows.items()
    }
    _, _, other = caption(inputs, tmp_path / "other", "--temperature", "0", "--fallback", "--seed", "7")
    assert other["a.wav"]["caption"] != a["caption"] and other["a.wav"]["attempts"] == 4

    # the run key: --fallback is a run of its own; without it the key is the one it always was
    assert a["run"] != caption(inputs, tmp_path / "plain", "--temperature", "0")[2]["a.wav"]["run"]

    # inspect shows the flag rates, export --drop-flagged leaves b out
    j = json.loads(run_cli(["inspect", tmp_path / "out", "--json"]).stdout)
    flags = j["run_details"][0]["flags"]
    assert flags["rows_judged"] == 3 and flags["rows_flagged"] == 1 and flags["rows_asked_again"] == 2
    assert flags["by_reason"]["repetition"] == {"rows": 1, "rate": pytest.approx(1 / 3)}
    text = run_cli(["inspect", tmp_path / "out"]).stdout
    assert "flags (successful rows)" in text and "repetition" in text
    e = run_cli(["export", tmp_path / "out", "--to", tmp_path / "clean.parquet", "--drop-flagged"])
    assert e.status == 0, e.stderr
    assert sorted(pq.read_table(tmp_path / "clean.parquet")["id"].to_pylist()) == ["a.wav", "c.wav"]


def test_fallback_on_and_ladder_are_options(tmp_path: Path, fake: FakeEngine) -> None:
    fake.loop = {"a.wav": float("inf")}
    fake.logprob = -2.0  # every clean caption is low_confidence too
    inputs = corpus(tmp_path / "in")
    extra = ["--temperature", "0.2", "--fallback", "--fallback-on", "repetition", "--fallback-temperatures", "0,0.5,1"]
    status, doc, rows = caption(inputs, tmp_path / "out", *extra)
    assert status == 0
    # a: first ask at the run's 0.2, then the rungs above it: 0.5, 1 → 3 attempts
    assert rows["a.wav"]["attempts"] == 3
    assert sorted(t for i, _, _, t, _ in fake.asked if i == "a.wav") == [0.2, 0.5, 1.0]
    # low_confidence is not in the re-ask set: b and c stay as they are, flagged
    assert rows["b.wav"]["attempts"] == 1 and rows["b.wav"]["flags"] == ["low_confidence"]
    assert doc["flags"]["low_confidence"] == 2  # b and c; a kept its 0.5 attempt (-0.6)
    # a lower --flag-min-logprob clears it (flags are not in the run key without --fallback)
    _, _, loose = caption(inputs, tmp_path / "loose", "--flag-min-logprob", "-3")
    assert loose["b.wav"]["flags"] == []


def test_a_crash_mid_ladder_leaves_no_row_and_resume_redoes_the_chunk(tmp_path: Path, fake: FakeEngine) -> None:
    fake.loop = {"a.wav": 0.5}
    inputs = corpus(tmp_path / "in")

    def crash() -> None:
        raise RuntimeError("injected crash")

    fake.after[2] = crash  # a's first re-ask answered, a still on the ladder
    status, _, rows = caption(inputs, tmp_path / "out", "--temperature", "0", "--fallback")
    assert status != 0 and "a.wav" not in rows
    fake.after.clear()
    fake.asked.clear()
    status, _, rows = caption(inputs, tmp_path / "out", "--temperature", "0", "--fallback")
    assert status == 0 and rows["a.wav"]["attempts"] == 4
    assert [t for i, _, _, t, _ in fake.asked if i == "a.wav"] == [0.0, 0.2, 0.4, 0.6]  # from the start
    keys = [(r["id"], r["chunk_index"]) for r in read_rows(tmp_path / "out")]
    assert sorted(keys) == [("a.wav", 0), ("b.wav", 0), ("c.wav", 0)]


def test_fallback_options_are_checked_before_any_model(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    with pytest.raises(SpecError, match="local executor only"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", fallback=True, executor="ray")
    with pytest.raises(SpecError, match="--fallback-on 'loop'"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", fallback=True, fallback_on="loop")
    with pytest.raises(SpecError, match="--fallback-temperatures"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", fallback=True, fallback_temperatures="hot")
    with pytest.raises(SpecError, match="--flag-min-logprob"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", flag_min_logprob=0.5)
    res = run_cli(["caption", tmp_path, "--out", tmp_path / "out", "--fallback", "--executor", "ray"])
    assert res.status == 2 and "local executor only" in res.stderr and not (tmp_path / "out").exists()

    # Without --fallback the identity (the run key) has exactly the keys it always had.
    base = CaptionSpec.build([str(tmp_path)], tmp_path / "o", temperature=0.0)
    tuned = CaptionSpec.build(
        [str(tmp_path)], tmp_path / "o", temperature=0.0, logprobs=False, flag_compression_ratio=3, flag_min_logprob=-2
    )
    assert base.run_key == tuned.run_key and "fallback" not in base.identity()
    assert "logprobs" not in base.identity()["sampling"]
    on = CaptionSpec.build([str(tmp_path)], tmp_path / "o", temperature=0.0, fallback=True)
    assert on.identity()["fallback"]["on"] == ["empty", "low_confidence", "repetition"]
    assert on.run_key != CaptionSpec.build([str(tmp_path)], tmp_path / "o", temperature=0.0, fallback=True,
                                           fallback_on="repetition").run_key  # fmt: skip
    assert parse_temperatures("0.4, 0,0.2") == (0.0, 0.2, 0.4)


def test_the_retry_feed_serves_re_asks_first_and_holds_the_end_until_every_answer_is_judged() -> None:
    class Job:
        quality = None
        fallback = FallbackPolicy()
        sampling = None

    inner: queue.Queue = queue.Queue()
    ladder = Ladder(Job(), feed=inner)
    feed = ladder.feed
    assert isinstance(feed, RetryFeed)
    inner.put("r1")
    inner.put(END)
    assert feed.get() == "r1" and ladder.out == 1
    with pytest.raises(queue.Empty):
        feed.get(block=False)  # END is held: r1's answer may send its chunk back
    feed.retry("again")  # it did
    ladder.out -= 1  # (what judge() does with r1's answer)
    assert feed.get() == "again" and ladder.out == 1
    ladder.out -= 1
    assert feed.get() is END
    # a stop lets END through at once and drops the re-asks waiting
    inner2: queue.Queue = queue.Queue()
    ladder2 = Ladder(Job(), feed=inner2)
    inner2.put("r1")
    inner2.put(END)
    assert ladder2.feed.get() == "r1"
    with pytest.raises(queue.Empty):
        ladder2.feed.get(block=False)
    ladder2.feed.retry(Request(chunk=_chunk(), prompt="p", text="t"))
    assert ladder2.stop() == 1 and ladder2.feed.get() is END


def _chunk() -> Chunk:
    return Chunk(AudioItem(id="x", path="x.wav"), 0, 1, 0.0, 1.0, None, 1.0)


@pytest.mark.engine
def test_real_engine_fills_avg_logprob_flags_loops_and_falls_back(tmp_path: Path, tiny_af3: Path) -> None:
    """The tiny random-weight AF3 through vLLM on CPU: log-probabilities come back (not in the run key),
    every caption that loops is flagged, and --fallback asks those chunks again (CPU: ~30 s on the
    session's shared engine, whose start the first engine test pays)."""
    from conftest import ENGINE_ARGS

    from flamingo_cli.quality import words

    inputs = tmp_path / "in"
    for i in range(3):
        make_audio(inputs / f"clip{i}.wav", 2.0, seed=i)
    base = ["caption", inputs, "--model", tiny_af3, *ENGINE_ARGS, "--logprobs"]
    res = run_cli([*base, "--out", tmp_path / "plain"])
    assert res.status == 0, res.stderr
    plain = read_rows(tmp_path / "plain")
    assert len(plain) == 3
    for r in plain:
        assert isinstance(r["avg_logprob"], float) and r["avg_logprob"] < 0 and r["attempts"] == 1
        ws = words(r["caption"])
        if any(ws[i : i + 5] == [ws[i]] * 5 for i in range(len(ws))):  # one word five times in a row
            assert "repetition" in r["flags"], r
    res = run_cli([*base, "--out", tmp_path / "fallback", "--fallback"])
    assert res.status == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(tmp_path / "fallback")}
    assert len(rows) == 3
    for r in plain:
        again = rows[r["id"]]
        if set(r["flags"]) & {"repetition", "low_confidence", "empty"}:
            assert again["attempts"] > 1
        else:
            assert again["attempts"] == 1 and again["caption"] == r["caption"]
    # this checkpoint loops on these clips (" noise help noise help …"): the test is not vacuous
    assert any("repetition" in r["flags"] for r in plain) and any(r["attempts"] > 1 for r in rows.values())
    # vLLM's log-probability kernels were compiled inside the engine start (VllmEngine.prepare), and the
    # warm-up requests left no row behind (three clips, three rows above)
    from conftest import cli_engine

    assert cli_engine(tiny_af3)._logprobs_ready is True
