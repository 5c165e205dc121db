"""The gates (flamingo_cli/gates.py): cheap measures of decoded audio, silent chunks and duplicate audio
written without an engine request, --keep-silence, resume across invocations, and the CLI's counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import make_audio, read_rows, run_cli
from fakes import FakeEngine

import flamingo_cli
from flamingo_cli.audio import decode
from flamingo_cli.gates import (
    FLOOR_DBFS,
    PARKED,
    Deduper,
    GateKeeper,
    GateSettings,
    audio_hash,
    measure,
)
from flamingo_cli.output.layout import current_rows
from flamingo_cli.records import AudioItem, Chunk, Request, Result

SR = 16000


def _noise(db: float, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """White noise at ``db`` dBFS RMS."""
    rng = np.random.default_rng(seed)
    return (10 ** (db / 20) * rng.standard_normal(round(seconds * SR))).astype(np.float32)


def _tone(seconds: float = 2.0, amplitude: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- measures ---------------------------------------------------------------------------------------


def test_digital_silence_reads_the_floor_and_no_activity() -> None:
    m = measure(np.zeros(SR, np.float32))
    assert (m.rms_dbfs, m.peak_dbfs, m.active_ratio) == (FLOOR_DBFS, FLOOR_DBFS, 0.0)
    assert GateSettings().silent(m)


def test_a_tone_reads_its_level() -> None:
    m = measure(_tone(amplitude=0.5))
    assert m.peak_dbfs == pytest.approx(20 * np.log10(0.5), abs=0.01)  # -6.02
    assert m.rms_dbfs == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.01)  # -9.03
    assert m.active_ratio == 1.0
    assert not GateSettings().silent(m)


def test_noise_at_minus_70_dbfs_is_silent_by_activity_not_by_peak() -> None:
    """Gaussian noise at -70 dBFS RMS peaks near -57 dBFS (above the -60 peak rule), yet no 20 ms frame
    reaches -50 dBFS: the activity rule calls it silent."""
    m = measure(_noise(-70.0))
    assert m.rms_dbfs == pytest.approx(-70.0, abs=0.2)
    assert -60.0 < m.peak_dbfs < -50.0
    assert m.active_ratio == 0.0
    assert GateSettings().silent(m)
    # Thresholds move the line: a stricter activity rule (none) and a lower peak rule keep it.
    assert not GateSettings(silence_peak_db=-80.0, silence_active_ratio=-1.0).silent(m)


def test_active_ratio_is_the_share_of_loud_frames() -> None:
    x = np.concatenate([np.zeros(SR, np.float32), _tone(1.0, amplitude=0.1)])  # 1 s silent, 1 s at -23 dBFS
    m = measure(x)
    assert m.active_ratio == pytest.approx(0.5, abs=0.02)
    assert not GateSettings().silent(m)
    assert GateSettings(silence_active_ratio=0.6).silent(m)
    quiet = measure(_tone(amplitude=10 ** (-65 / 20)))  # a tone peaking at -65 dBFS
    assert GateSettings().silent(quiet) and not GateSettings(silence_peak_db=-70.0, silence_active_ratio=-1).silent(
        quiet
    )


def test_the_hash_is_of_decoded_samples_so_a_wav_and_its_flac_agree(tmp_path: Path) -> None:
    make_audio(tmp_path / "a.wav", 1.5, seed=3)
    data, sr = sf.read(tmp_path / "a.wav", dtype="int16")
    sf.write(tmp_path / "a.flac", data, sr, subtype="PCM_16")
    wav = decode(AudioItem(id="w", path=str(tmp_path / "a.wav"))).samples
    flac = decode(AudioItem(id="f", path=str(tmp_path / "a.flac"))).samples
    assert audio_hash(wav) == audio_hash(flac)
    assert audio_hash(wav) != audio_hash(wav[:-1])


# --- the deduper ------------------------------------------------------------------------------------


def _request(item_id: str, samples: np.ndarray, prompt: str = "Describe.", index: int = 0) -> Request:
    chunk = Chunk(AudioItem(id=item_id, path=f"/{item_id}"), index, 1, 0.0, 1.0, samples, 1.0)
    GateSettings().apply(chunk)
    return Request(chunk=chunk, prompt=prompt, text="t")


def test_a_duplicate_of_a_chunk_in_flight_waits_for_it_and_carries_its_answer() -> None:
    keeper = GateKeeper(GateSettings(), Deduper())
    x = _tone()
    original, dup, other_prompt = _request("a", x), _request("b", x.copy()), _request("c", x, prompt="Other.")
    assert keeper.route(original) is None  # first in input order: sent
    assert keeper.route(dup) is PARKED
    assert keeper.route(other_prompt) is None  # another prompt asks another question: sent
    rows = keeper.resolved(Result(original.chunk, "Describe.", caption="a tone", finish_reason="stop"))
    assert [(r.chunk.item.id, r.caption, r.gate, r.duplicate_of, r.duplicate_of_chunk) for r in rows] == [
        ("b", "a tone", "duplicate", "a", 0)
    ]
    later = keeper.route(_request("d", x))  # the original is answered: written at once
    assert isinstance(later, Result) and later.caption == "a tone" and later.duplicate_of == "a"


def test_a_duplicate_of_a_failed_original_names_it_in_its_error() -> None:
    keeper = GateKeeper(GateSettings(), Deduper())
    original, dup = _request("a", _tone()), _request("b", _tone())
    assert keeper.route(original) is None and keeper.route(dup) is PARKED
    (row,) = keeper.resolved(Result(original.chunk, "Describe.", error="rejected by the engine: x"))
    assert row.caption is None and row.gate == "duplicate" and "'a' chunk 0" in row.error and "x" in row.error


def test_silence_is_routed_before_the_deduper_and_dedupe_can_be_off() -> None:
    keeper = GateKeeper(GateSettings(dedupe_audio=False), Deduper())
    silent = keeper.route(_request("s", np.zeros(SR, np.float32)))
    assert isinstance(silent, Result) and silent.gate == "silence" and silent.caption is None
    assert keeper.route(_request("a", _tone())) is None and keeper.route(_request("b", _tone())) is None


# --- a run with the fake engine ---------------------------------------------------------------------


def _corpus(root: Path) -> dict[str, str]:
    """Digital silence, near-silence, normal files, and duplicates under other names and containers.
    Returns {file: what it is}."""
    root.mkdir(parents=True)
    sf.write(root / "silence.wav", np.zeros(2 * SR, np.float32), SR, subtype="PCM_16")
    sf.write(root / "quiet.wav", _noise(-70.0), SR, subtype="PCM_16")
    make_audio(root / "a.wav", 2.0, seed=1)
    data, _ = sf.read(root / "a.wav", dtype="int16")
    sf.write(root / "a_copy.flac", data, SR, subtype="PCM_16")  # the same PCM in another container
    make_audio(root / "b.wav", 2.0, seed=2)
    shutil.copy(root / "b.wav", root / "c_same_as_b.wav")  # the same bytes under another name
    make_audio(root / "d.wav", 2.0, seed=4)
    return {
        "a.wav": "sent",
        "a_copy.flac": "duplicate of a.wav",
        "b.wav": "sent",
        "c_same_as_b.wav": "duplicate of b.wav",
        "d.wav": "sent",
        "quiet.wav": "silence",
        "silence.wav": "silence",
    }


def _caption(src: Path, out: Path, engine: FakeEngine, **options: Any) -> Any:
    return flamingo_cli.caption(
        [str(src)], str(out), engine=engine, model="af3", temperature=0, max_tokens=8, quiet=True, **options
    )


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import flamingo_cli.prompts

    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_silence_and_duplicates_get_rows_without_engine_requests(tmp_path: Path, offline: None) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    kinds = _corpus(src)
    engine = FakeEngine()
    report = _caption(src, out, engine)
    assert report.status == 0
    assert sorted(i for i, _ in engine.requests) == ["a.wav", "b.wav", "d.wav"]  # nothing else reached it
    rows = {r["id"]: r for r in read_rows(out)}
    assert set(rows) == set(kinds)  # every file has its outcome row
    for name in ("silence.wav", "quiet.wav"):
        r = rows[name]
        assert (r["gate"], r["caption"], r["error"]) == ("silence", None, None)
    assert rows["silence.wav"]["peak_dbfs"] == FLOOR_DBFS and rows["quiet.wav"]["active_ratio"] == 0.0
    for dup, orig in (("a_copy.flac", "a.wav"), ("c_same_as_b.wav", "b.wav")):
        r = rows[dup]
        assert (r["gate"], r["duplicate_of"], r["duplicate_of_chunk"]) == ("duplicate", orig, 0)
        assert r["caption"] == rows[orig]["caption"] == f"fake:{orig}#0" and r["error"] is None
        assert r["audio_sha256"] == rows[orig]["audio_sha256"] and r["finish_reason"] == "stop"
    for name in ("a.wav", "b.wav", "d.wav"):
        r = rows[name]
        assert r["gate"] is None and r["duplicate_of"] is None and r["peak_dbfs"] > -20 and r["active_ratio"] == 1.0
    assert len({r["audio_sha256"] for r in rows.values()}) == 5
    s = report.summary
    assert (s["chunks_silent"], s["chunks_duplicate"], s["requests_sent"], s["chunks_ok"]) == (2, 2, 3, 7)
    assert s["files_ok"] == 7 and s["files_failed"] == 0

    again = _caption(src, out, engine)  # rerun: everything is done, no request
    assert again.nothing_to_do and len(engine.requests) == 3 and len(read_rows(out)) == 7

    kept = _caption(src, out, engine, keep_silence=True)  # the gated chunks, captioned now
    assert sorted(i for i, _ in engine.requests[3:]) == ["quiet.wav", "silence.wav"]
    assert kept.run_key == report.run_key  # the gates are not in the run key
    now = {r["id"]: r for r in current_rows(_table(out)).to_pylist()}
    assert now["silence.wav"]["caption"] == "fake:silence.wav#0" and now["silence.wav"]["gate"] is None
    assert now["a_copy.flac"]["gate"] == "duplicate"
    assert _caption(src, out, engine, keep_silence=True).nothing_to_do and len(engine.requests) == 5


def _table(out: Path) -> Any:
    import pyarrow.dataset as ds

    return ds.dataset(out, partitioning="hive", format="parquet").to_table()


def test_duplicates_of_an_earlier_invocation_copy_its_stored_answer(tmp_path: Path, offline: None) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_audio(src / "a.wav", 2.0, seed=1)
    engine = FakeEngine()
    _caption(src, out, engine)
    shutil.copy(src / "a.wav", src / "z_new_copy.wav")  # arrives later, same audio
    make_audio(src / "y_new.wav", 2.0, seed=5)
    report = _caption(src, out, engine)
    assert [i for i, _ in engine.requests] == ["a.wav", "y_new.wav"]
    rows = {r["id"]: r for r in read_rows(out)}
    z = rows["z_new_copy.wav"]
    assert (z["caption"], z["gate"], z["duplicate_of"]) == ("fake:a.wav#0", "duplicate", "a.wav")
    assert report.summary["chunks_duplicate"] == 1 and report.summary["requests_sent"] == 1


def test_a_stop_with_a_parked_duplicate_redoes_only_it(tmp_path: Path, offline: None) -> None:
    """The original's result is written, then the run stops before its parked duplicate is: resume
    writes the duplicate (from the stored answer), nothing else, no request."""
    import threading

    src, out = tmp_path / "in", tmp_path / "out"
    make_audio(src / "a.wav", 2.0, seed=1)
    shutil.copy(src / "a.wav", src / "b.wav")
    stop = threading.Event()
    engine = FakeEngine()
    engine.delay = 0.3  # b is parked while a is in the engine
    engine.after[1] = stop.set
    report = flamingo_cli.caption(
        [str(src)], str(out), engine=engine, model="af3", temperature=0, max_tokens=8, quiet=True, stop_event=stop
    )
    ids = sorted(r["id"] for r in read_rows(out))
    assert ids in (["a.wav"], ["a.wav", "b.wav"]), report.summary  # b only if resolved before the stop
    resumed = _caption(src, out, FakeEngine())
    rows = {r["id"]: r for r in current_rows(_table(out)).to_pylist()}
    assert sorted(rows) == ["a.wav", "b.wav"] and len(read_rows(out)) == 2
    assert rows["b.wav"]["caption"] == "fake:a.wav#0" and rows["b.wav"]["duplicate_of"] == "a.wav"
    assert resumed.summary["requests_sent"] == 0


def test_no_dedupe_audio_sends_every_copy(tmp_path: Path, offline: None) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_audio(src / "a.wav", 2.0, seed=1)
    shutil.copy(src / "a.wav", src / "b.wav")
    engine = FakeEngine()
    report = _caption(src, out, engine, dedupe_audio=False)
    assert sorted(i for i, _ in engine.requests) == ["a.wav", "b.wav"]
    assert report.summary["chunks_duplicate"] == 0
    assert {r["gate"] for r in read_rows(out)} == {None}


def test_the_cli_options_and_the_summary_counts(tmp_path: Path, fake: FakeEngine) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _corpus(src)
    summary = tmp_path / "summary.json"
    args = ["--model", "af3", "--temperature", "0", "--max-tokens", "8"]
    r = run_cli(["caption", src, "--out", out, *args, "--silence-peak-db", "-80", "--summary-json", summary])
    assert r.status == 0, r.stderr
    doc = json.loads(summary.read_text())
    # -80 dBFS peak: near-silence is still silent by its activity (no frame reaches -50 dBFS)
    assert (doc["chunks_silent"], doc["chunks_duplicate"], doc["requests_sent"]) == (2, 2, 3)
    assert "chunks_silent=2 chunks_duplicate=2 requests_sent=3" in r.stderr  # the done line
    bad = run_cli(["caption", src, "--out", out, *args, "--silence-active-ratio", "1"])
    assert bad.status == 2 and "--silence-active-ratio" in bad.stderr
    bad = run_cli(["caption", src, "--out", out, *args, "--silence-peak-db", "3"])
    assert bad.status == 2 and "--silence-peak-db" in bad.stderr
    kept = run_cli(["caption", src, "--out", out, *args, "--keep-silence", "--no-dedupe-audio", "--quiet"])
    assert kept.status == 0, kept.stderr
    assert sorted(i for i, _ in fake.requests) == ["a.wav", "b.wav", "d.wav", "quiet.wav", "silence.wav"]
    plan = run_cli(["caption", src, "--out", out, *args, "--dry-run", "--json"])  # counts from the rows so far
    assert json.loads(plan.stdout)["gated_on_disk"] == {"silence": 2, "duplicate": 2}, plan.stderr
    inspect = run_cli(["inspect", out, "--json"])
    doc = json.loads(inspect.stdout)
    run = doc["run_details"][0]
    assert (run["chunks_silent"], run["chunks_duplicate"]) == (0, 2)  # current rows: the silent ones captioned
    assert (doc["chunks_silent"], doc["chunks_duplicate"]) == (0, 2)


# --- voice activity (--vad) -------------------------------------------------------------------------


def test_vad_fills_speech_columns_in_absolute_track_time(tmp_path: Path) -> None:
    """Silero on a speech-like signal between silences: speech_ratio is filled on every chunk, 0 on the
    silent one, and the segments are in the file's time (the item's offset and the chunk's start added)."""
    pytest.importorskip("silero_vad")
    from audiogen import speech_like

    from flamingo_cli.models import AF3
    from flamingo_cli.prepare import prepare
    from flamingo_cli.prompts import PromptBuilder

    # the file: 3 s silence, 4 s speech-like, 5 s silence; the item: 1 s .. 11 s of it, in 5 s chunks
    x = np.concatenate([np.zeros(3 * SR, np.float32), speech_like(4.0), np.zeros(5 * SR, np.float32)])
    sf.write(tmp_path / "talk.wav", x, SR, subtype="PCM_16")
    item = AudioItem(id="talk", path=str(tmp_path / "talk.wav"), offset=1.0, duration=10.0)
    ready = prepare(
        item, max_chunk_s=30.0, chunk_s=5.0, overlap_s=0.0, prompts=PromptBuilder(AF3), prompt="Describe.",
        gates=GateSettings(vad=True, keep_silence=True),
    )  # fmt: skip
    chunks = [r.chunk for r in ready.requests]
    assert [(c.start_s, c.end_s) for c in chunks] == [(0.0, 5.0), (5.0, 10.0)]
    first, second = (c.measures for c in chunks)
    assert first.speech_ratio > 0 and first.speech_segments
    start = first.speech_segments[0]["start_s"]
    assert 2.7 <= start <= 3.3, first.speech_segments  # the speech starts 3 s into the file
    for m, c in ((first, chunks[0]), (second, chunks[1])):
        assert all(1.0 + c.start_s <= s["start_s"] < s["end_s"] <= 1.0 + c.end_s + 0.05 for s in m.speech_segments)
    chunk = Chunk(AudioItem(id="z", path="/z"), 0, 1, 0.0, 2.0, np.zeros(2 * SR, np.float32), 2.0)
    m = GateSettings(vad=True).apply(chunk)
    assert (m.speech_ratio, m.speech_segments, m.gate) == (0.0, [], "silence")


def test_gate_options_are_checked_before_a_model_and_stay_out_of_the_run_key(tmp_path: Path) -> None:
    from flamingo_cli.spec import CaptionSpec, SpecError

    make_audio(tmp_path / "a.wav", 1.0)
    base = CaptionSpec.build([tmp_path], tmp_path / "out", model="af3")
    tuned = CaptionSpec.build(
        [tmp_path], tmp_path / "out", model="af3", keep_silence=True, silence_peak_db=-70, dedupe_audio=False
    )
    assert tuned.run_key == base.run_key and tuned.silence_peak_db == -70.0
    assert tuned.job().gates == GateSettings(keep_silence=True, silence_peak_db=-70.0, dedupe_audio=False)
    with pytest.raises(SpecError, match="--executor ray"):
        CaptionSpec.build([tmp_path], tmp_path / "out", model="af3", executor="ray", keep_silence=True)
    assert CaptionSpec.build([tmp_path], tmp_path / "out", model="af3", executor="ray").job().gates is None
    with pytest.raises(SpecError, match="keep_silence"):
        CaptionSpec.build([tmp_path], tmp_path / "out", model="af3", keep_silence="yes")
