"""Track rows (flamingo_cli/tracks.py): a file cut into several chunks gets one caption of the whole,
made by a text-only request from its chunks' captions; exactly once, resumed alone, never in the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from audiogen import tone
from conftest import make_audio, read_rows, run_cli

from flamingo_cli.config import load_preset
from flamingo_cli.tracks import NO_CAPTION, Part, track_text

CAPTION_PROMPT = load_preset("caption").track_prompt


@pytest.fixture(scope="module")
def long_track(tmp_path_factory) -> Path:
    """25 minutes at 16 kHz: AF3's 600-s cap cuts it into 0-510, 510-1020 and 1020-1500 s."""
    path = tmp_path_factory.mktemp("long") / "long.wav"
    import numpy as np

    # A little noise: a steady tone repeats exactly from chunk to chunk (the duplicate-audio gate's case).
    x = tone(16000, 1500.0, 1, 220.0)[0] + 0.01 * np.random.default_rng(0).standard_normal(1500 * 16000)
    sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")
    return path


def _inputs(tmp_path: Path, long_track: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "long.wav").symlink_to(long_track)
    make_audio(folder / "short.wav", 3.0)
    return folder


def _rows(out: Path) -> list[dict]:
    return sorted(read_rows(out), key=lambda r: (r["id"], r["chunk_index"]))


def _keys(out: Path) -> list[tuple[str, int, str]]:
    return [(r["id"], r["chunk_index"], r["level"]) for r in _rows(out)]


ALL_KEYS = [
    ("long.wav", -1, "track"),
    ("long.wav", 0, "chunk"),
    ("long.wav", 1, "chunk"),
    ("long.wav", 2, "chunk"),
    ("short.wav", 0, "chunk"),
]
PARTS_TEXT = "[0:00-8:30] fake:long.wav#0\n[8:30-17:00] fake:long.wav#1\n[17:00-25:00] fake:long.wav#2"


def test_a_long_file_gets_three_chunk_rows_and_one_track_row(fake, long_track: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli(["caption", _inputs(tmp_path, long_track), "--out", out, "--model", "af3", "--quiet"])
    assert r.status == 0, r.stderr
    assert _keys(out) == ALL_KEYS  # a one-chunk file gets no track row
    track = _rows(out)[0]
    assert (track["num_chunks"], track["start_s"], track["end_s"]) == (3, 0.0, 1500.0)
    assert (track["caption"], track["prompt"], track["error"]) == ("fake-track:long.wav", CAPTION_PROMPT, None)
    assert track["segments"] == [] and track["source_version"] == 0 and track["source_size"] is not None
    # One text-only request, the chunks' captions with their times in the file, then the instruction.
    ((key, text),) = fake.text_requests
    assert key == ("long.wav", -1)
    assert PARTS_TEXT in text and text.index(PARTS_TEXT) < text.index(CAPTION_PROMPT)
    assert "<sound>" not in text and "<|im_start|>user\n" in text
    # inspect's samples call it the track (with the span it covers), not chunk "0/3"
    shown = run_cli(["inspect", out, "--samples", "5"])
    assert shown.status == 0 and "track (0–1500 s)" in shown.stdout and "0/3" not in shown.stdout


def test_a_crash_before_the_track_row_redoes_the_track_row_only(fake, long_track: Path, tmp_path: Path) -> None:
    """Chunk rows written, track row not (the state a crash between them leaves; also a run before
    track rows existed): the next run asks for the track row alone, from the rows on disk."""
    inputs, out = _inputs(tmp_path, long_track), tmp_path / "out"
    args = ["caption", inputs, "--out", out, "--model", "af3", "--quiet"]
    assert run_cli([*args, "--no-track-summary"]).status == 0
    assert [k for k in _keys(out) if k[2] == "track"] == []
    audio_requests = len(fake.requests)
    assert audio_requests == 4 and fake.text_requests == []

    run_key = next(out.glob("run=*")).name
    r = run_cli(args)
    assert r.status == 0, r.stderr
    assert fake.requests[audio_requests:] == [("long.wav", -1)]  # nothing decoded or captioned again
    assert PARTS_TEXT in fake.text_requests[0][1]
    assert _keys(out) == ALL_KEYS and next(out.glob("run=*")).name == run_key  # the same run

    r = run_cli(args)  # and exactly once
    assert r.status == 0, r.stderr
    assert len(fake.requests) == audio_requests + 1 and _keys(out) == ALL_KEYS


def test_a_crash_between_chunks_finishes_the_chunks_then_the_track(fake, long_track: Path, tmp_path: Path) -> None:
    """Killed after two chunk rows: the resume captions the third and builds the track row from all three
    (two read back from the output)."""
    out = tmp_path / "out"
    args = ["caption", long_track, "--out", out, "--model", "af3", "--quiet"]

    def crash() -> None:
        raise RuntimeError("injected crash after the second chunk")

    fake.after[2] = crash
    assert run_cli(args).status != 0
    assert _keys(out) == [("long.wav", 0, "chunk"), ("long.wav", 1, "chunk")]
    fake.after.clear()
    before = len(fake.requests)
    assert run_cli(args).status == 0
    assert fake.requests[before:] == [("long.wav", 2), ("long.wav", -1)]
    assert PARTS_TEXT in fake.text_requests[-1][1]
    assert _keys(out) == ALL_KEYS[:4]


def test_no_track_summary_and_an_all_failed_item(fake, long_track: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake.fail_ids = {"long.wav"}
    r = run_cli(["caption", long_track, "--out", out, "--model", "af3", "--quiet"])
    assert r.status == 1
    track = _rows(out)[0]
    assert (track["chunk_index"], track["level"], track["error"], track["segments"]) == (-1, "track", NO_CAPTION, None)
    assert fake.text_requests == []  # nothing to summarise: no request


def test_describe_music_prints_the_whole_track_first(fake, long_track: Path) -> None:
    r = run_cli(["describe-music", long_track, "--model", "af3", "--json"])
    assert r.status == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["track"]["description"] == "fake-track:long.wav"
    assert [s["chunk_index"] for s in doc["sections"]] == [0, 1, 2]
    r = run_cli(["describe-music", long_track, "--model", "af3"])
    assert r.stdout.index("fake-track:long.wav") < r.stdout.index("fake:long.wav#0")


def test_track_text_names_failed_parts_and_keeps_to_its_budget() -> None:
    parts = [Part(1, 60.0, 120.0, None), Part(0, 0.0, 60.0, "x" * 5000)]
    text = track_text("Summarise.", parts, 120.0, budget_chars=1000)
    assert text.splitlines()[0] == "Descriptions of the 2 consecutive parts of one 2:00 recording:"
    assert "[0:00-1:00] " + "x" * 1000 + " …" in text
    assert "[1:00-2:00] (no description: this part failed)" in text and text.endswith("\n\nSummarise.")


def test_track_options(tmp_path: Path) -> None:
    from flamingo_cli.spec import CaptionSpec, SpecError

    base = CaptionSpec.build([str(tmp_path)], tmp_path / "o")
    assert base.track_prompt == CAPTION_PROMPT
    other = CaptionSpec.build([str(tmp_path)], tmp_path / "o", track_prompt="Sum up.")
    off = CaptionSpec.build([str(tmp_path)], tmp_path / "o", no_track_summary=True)
    assert (other.track_prompt, off.track_prompt) == ("Sum up.", None)
    assert base.run_key == other.run_key == off.run_key  # track rows change no chunk row, nor the run
    assert CaptionSpec.build([str(tmp_path)], tmp_path / "o", executor="ray").track_prompt is None
    with pytest.raises(SpecError, match="local executor only"):
        CaptionSpec.build([str(tmp_path)], tmp_path / "o", executor="ray", track_prompt="Sum up.")


@pytest.mark.engine
def test_a_track_row_through_the_real_engine(tiny_af3, tmp_path: Path) -> None:
    """The text-only request (no audio, the checkpoint's chat template) through vLLM's CPU engine."""
    from conftest import ENGINE_ARGS

    out = tmp_path / "out"
    make_audio(tmp_path / "in" / "a.wav", 70.0)
    r = run_cli(["caption", tmp_path / "in", "--out", out, "--model", tiny_af3, "--chunk-seconds", "30", *ENGINE_ARGS])
    assert r.status == 0, r.stderr
    rows = _rows(out)
    assert [(x["chunk_index"], x["level"]) for x in rows] == [(-1, "track"), (0, "chunk"), (1, "chunk"), (2, "chunk")]
    track = rows[0]
    assert track["error"] is None and isinstance(track["caption"], str) and track["finish_reason"] in ("stop", "length")
    # The prompt carries the three chunk captions as text: far more tokens than its instruction alone.
    assert track["prompt_tokens"] > 3 * 8 and track["output_tokens"] >= 1 and track["segments"] is not None


def test_gated_chunks_are_parts_of_the_track_and_a_silent_file_asks_nothing(fake, tmp_path: Path) -> None:
    """The gates write some chunk rows without the engine (silence, duplicates): the track stage hears of
    them too, so the track request still goes out (naming the silent part) and the run ends; a file
    silent throughout gets a silent track row and no request at all."""
    import numpy as np
    from audiogen import tone as make_tone

    sr = 16000
    loud = make_tone(sr, 510.0, 1, 330.0)[0]
    quiet = np.zeros_like(loud)
    folder = tmp_path / "in"
    folder.mkdir()
    # AF3's 600-s cap cuts 1530 s into three 510-s chunks: loud, silent, loud (another tone).
    sf.write(
        folder / "mixed.wav", np.concatenate([loud, quiet, make_tone(sr, 510.0, 1, 550.0)[0]]), sr, subtype="PCM_16"
    )
    sf.write(folder / "silent.wav", np.zeros(int(1530 * sr), np.float32), sr, subtype="PCM_16")
    out = tmp_path / "out"
    r = run_cli(["caption", folder, "--out", out, "--model", "af3", "--quiet"])
    assert r.status == 0, r.stderr
    rows = {(x["id"], x["chunk_index"]): x for x in read_rows(out)}
    assert sorted(rows) == [("mixed.wav", i) for i in (-1, 0, 1, 2)] + [("silent.wav", i) for i in (-1, 0, 1, 2)]
    assert [rows[("mixed.wav", i)]["gate"] for i in (0, 1, 2)] == [None, "silence", None]
    assert rows[("mixed.wav", -1)]["caption"] == "fake-track:mixed.wav"
    ((key, text),) = fake.text_requests
    assert key == ("mixed.wav", -1) and "[8:30-17:00] (silence)" in text
    silent_track = rows[("silent.wav", -1)]
    assert (silent_track["gate"], silent_track["caption"], silent_track["error"]) == ("silence", None, None)
    assert sorted(k for k in fake.requests if k[1] >= 0) == [("mixed.wav", 0), ("mixed.wav", 2)]
