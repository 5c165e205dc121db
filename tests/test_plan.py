"""caption --dry-run (no model, no torch/vLLM, headers only, streaming) and the presets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import tracemalloc

import pytest
from conftest import make_audio, run_cli

from flamingo_cli.models import num_audio_tokens


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "audio"
    make_audio(root / "a.wav", 3.0)  # 1 chunk, 1 window, 75 tokens
    make_audio(root / "b.flac", 45.0, sr=44100, channels=2)  # 1 chunk, 2 windows
    make_audio(root / "sub" / "long.flac", 700.0, sr=8000)  # AF3 cap 600 s: 360 + 340 s, 24 windows
    (root / "broken.wav").write_bytes(b"not audio at all")  # no duration in its header
    return root


def plan_json(args) -> dict:
    res = run_cli(["caption", *args, "--dry-run", "--json"])
    assert res.status == 0, res.stderr
    return json.loads(res.stdout)


def test_dry_run_counts_from_headers_and_writes_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    doc = plan_json([corpus, "--out", out])
    assert not out.exists()  # a plan creates no output folder
    assert doc["family"] == "af3" and doc["model"] == "nvidia/audio-flamingo-3-hf"
    assert (doc["files"], doc["readable"], doc["no_duration"]) == (4, 3, 1)
    assert doc["duration_s"] == pytest.approx(748.0, abs=1e-3)
    assert doc["chunks"] == 4  # a, b, and long.flac in two balanced, window-aligned chunks
    assert doc["windows"] == 1 + 2 + 12 + 12
    full = num_audio_tokens(30 * 16000)
    assert full == 750
    expected_tokens = (
        num_audio_tokens(3 * 16000)
        + num_audio_tokens(45 * 16000)
        + num_audio_tokens(360 * 16000)
        + num_audio_tokens(340 * 16000)
    )
    assert doc["audio_tokens"] == expected_tokens
    assert doc["gpu_windows_per_s"] == 29.5
    assert doc["gpu_s"] == pytest.approx(doc["windows"] / 29.5)
    assert list(doc["problems"]) == ["no duration in header (a corrupt file: decoding will likely fail)"]
    assert doc["problems"][next(iter(doc["problems"]))][0].endswith("broken.wav")


def test_dry_run_fixed_chunks_segments_and_bad_rows(corpus, tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"id": "seg1", "path": str(corpus / "b.flac"), "offset": 10, "duration": 20},  # 20 s
        {"id": "seg2", "path": str(corpus / "b.flac"), "offset": 40},  # the last 5 s
        {"id": "seg3", "path": str(corpus / "b.flac"), "offset": 50},  # beyond the end
        {"id": "gone", "path": str(tmp_path / "missing.wav")},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = plan_json([manifest, "--out", tmp_path / "o", "--chunk-seconds", "10", "--overlap", "2"])
    assert (doc["files"], doc["readable"], doc["segment_errors"], doc["source_errors"]) == (4, 2, 1, 1)
    assert doc["duration_s"] == pytest.approx(25.0, abs=1e-3)
    # 20 s in 10 s chunks with 2 s overlap: 0-10, 8-18, 16-20; 5 s: one chunk
    assert doc["chunks"] == 4 and doc["chunk_s"] == 10 and doc["overlap_s"] == 2
    assert set(doc["problem_counts"]) == {"offset beyond the end of the file", "file not found"}


def test_dry_run_never_decodes(corpus, tmp_path, monkeypatch):
    import flamingo_cli.audio

    def no_decode(*_a, **_k):
        raise AssertionError("dry-run decoded audio")

    monkeypatch.setattr(flamingo_cli.audio, "decode", no_decode)
    monkeypatch.setattr(flamingo_cli.audio, "_read_soundfile", no_decode)
    assert plan_json([corpus, "--out", tmp_path / "o"])["readable"] == 3


def test_dry_run_imports_neither_torch_nor_vllm(corpus, tmp_path):
    code = (
        "import sys, io, contextlib\n"
        "from flamingo_cli.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main(['caption', {str(corpus)!r}, '--out', {str(tmp_path / 'o')!r}, '--dry-run'])\n"
        "assert rc == 0, rc\n"
        "print(','.join(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_dry_run_table(corpus, tmp_path):
    res = run_cli(["caption", corpus, "--out", tmp_path / "o", "--dry-run"])
    assert res.status == 0, res.stderr
    for text in ("no model loaded", "files", "readable", "chunks", "encoder windows", "audio tokens", "GPU time"):
        assert text in res.stdout
    assert "broken.wav" in res.stdout and "problems" in res.stdout


def test_dry_run_streams_a_large_manifest(tmp_path):
    """Memory stays flat: only totals are kept, not one record per row."""
    make_audio(tmp_path / "x.wav", 60.0)
    make_audio(tmp_path / "y.flac", 45.0)
    manifest = tmp_path / "m.csv"
    n = 6000
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "offset", "duration"])
        for i in range(n):
            w.writerow([f"row{i}", "x.wav" if i % 2 else "y.flac", i % 30, 10])
    from flamingo_cli.models import AF3
    from flamingo_cli.plan import make_plan
    from flamingo_cli.sources import iter_items

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        plan = make_plan(iter_items([str(manifest)]), AF3, model="af3", task="caption", workers=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (plan.files, plan.readable, plan.chunks) == (n, n, n)
    assert plan.duration_s == pytest.approx(10.0 * n)
    # Keeping the rows would take > 2.7 MiB here (an AudioItem and its dicts are ~0.5 KB each); the
    # manifest reader's own duplicate-id set is ~0.1 KB a row.
    assert peak < 1.8 * 2**20, f"peak {peak / 2**20:.1f} MiB for {n} rows"
    assert time.perf_counter() - t0 < 60


def test_presets_json_lists_the_shipped_presets():
    res = run_cli(["presets", "--json"])
    assert res.status == 0, res.stderr
    docs = {p["name"]: p for p in json.loads(res.stdout)}
    assert {"caption", "describe-music", "lyrics", "transcribe"} <= set(docs)
    assert docs["lyrics"]["model"] == "mf" and docs["lyrics"]["sampling"]["temperature"] == 0.0
    assert docs["caption"]["file"].endswith("caption.toml")


def test_preset_by_name_or_path_and_flags_override(corpus, tmp_path):
    # by name: lyrics is a Music Flamingo preset -> MF's 1200 s cap, one chunk for the 700 s file
    doc = plan_json([corpus, "--out", tmp_path / "o", "--task", "lyrics"])
    assert (doc["family"], doc["task"], doc["max_chunk_s"]) == ("mf", "lyrics", 1200.0)
    assert doc["chunks"] == 3
    # by path, with --config
    custom = tmp_path / "mine.toml"
    custom.write_text('[task]\nname = "mine"\nmodel = "mf"\nprompt = "Name the instruments."\n')
    doc = plan_json([corpus, "--out", tmp_path / "o", "--config", custom])
    assert (doc["family"], doc["task"]) == ("mf", "mine")
    # a flag overrides the preset's model
    doc = plan_json([corpus, "--out", tmp_path / "o", "--config", custom, "--model", "af3"])
    assert (doc["family"], doc["max_chunk_s"], doc["chunks"]) == ("af3", 600.0, 4)
    res = run_cli(["caption", corpus, "--out", tmp_path / "o", "--task", "nope", "--dry-run"])
    assert res.status == 2 and "nope" in res.stderr
