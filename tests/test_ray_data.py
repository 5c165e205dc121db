"""The Ray Data path end to end: a local Ray cluster, ray.data.llm driving the CPU vLLM engine on the tiny
AF3 checkpoint, rows and schema compared with what ``flamingo caption`` writes for the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ENGINE_ARGS, make_audio, read_rows, run_cli

from flamingo_cli.engine import Sampling
from flamingo_cli.output.layout import SCHEMA

# Ray's own modules raise pydantic deprecation warnings on import; they are not flamingo's.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Compared column by column: every core column (output.layout.SCHEMA) and the hive column; created_at differs by
# design, captions are compared separately.
# avg_logprob: the Ray path asks for no log-probabilities (null there), so its flags lack low_confidence.
# The gates' columns (flamingo_cli/gates.py) are the local executor's: --executor ray applies no gates (null).
GATE_COLUMNS = ("rms_dbfs", "peak_dbfs", "active_ratio", "speech_ratio", "speech_segments", "audio_sha256", "gate")
GATE_COLUMNS += ("duplicate_of", "duplicate_of_chunk")
COMPARED = [
    name for name in SCHEMA.names if name not in ("created_at", "caption", "avg_logprob", "flags", *GATE_COLUMNS)
] + ["run"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Short files in three formats, one split into chunks, one too short for a sound token, one broken."""
    root = tmp_path_factory.mktemp("ray-corpus")
    make_audio(root / "a.wav", 2.0, seed=0)
    make_audio(root / "b_44k_stereo.flac", 5.0, 44100, 2, seed=1)
    make_audio(root / "sub" / "c.ogg", 45.0, 22050, seed=2)  # 20 + 20 + 5 s with --chunk-seconds 20
    make_audio(root / "tiny.wav", 0.005, seed=3)  # 80 samples: a chunk-level error row
    (root / "broken.wav").write_bytes(b"this is not audio")
    return root


def test_prepare_item_decodes_chunks_and_renders_prompts(corpus):
    """The Ray task body, without Ray: chunk rows with audio and prompt, skipped chunks left out."""
    from flamingo_cli.models import AF3
    from flamingo_cli.prompts import PromptBuilder
    from flamingo_cli.ray_data import prepare_item, to_engine_row

    kwargs = dict(family="af3", chat_template=None, max_chunk_s=600.0, chunk_s=20.0, overlap_s=0.0, seed=None)
    row = {"seq": 3, "id": "sub/c.ogg", "path": str(corpus / "sub" / "c.ogg"), "offset": 0.0, "duration": None}
    rows = prepare_item({**row, "prompt": "Say.", "skip": [1]}, **kwargs)
    assert [(r["chunk_index"], r["num_chunks"], r["todo"], r["seq"]) for r in rows] == [(0, 3, 2, 3), (2, 3, 2, 3)]
    assert rows[0]["text"] == PromptBuilder(AF3).text("Say.") and rows[0]["error"] is None
    assert rows[0]["audio"].dtype == np.float32 and len(rows[0]["audio"]) == 20 * 16000
    assert len(rows[1]["audio"]) == 5 * 16000 and rows[1]["seed"] == -1

    engine_row = to_engine_row(rows[1], sampling={"temperature": 0.0, "max_tokens": 8})
    ((audio, rate),) = engine_row["multimodal_data"]["audio"]
    assert rate == 16000 and len(audio) == 5 * 16000 and engine_row["audio"] is None
    assert engine_row["sampling_params"] == {"temperature": 0.0, "max_tokens": 8}

    (bad,) = prepare_item({**row, "id": "broken.wav", "path": str(corpus / "broken.wav"), "prompt": "Say."}, **kwargs)
    assert bad["num_chunks"] == 0 and "broken.wav" in bad["error"] and bad["todo"] == 1
    assert to_engine_row(bad, sampling={})["__inference_error__"] == bad["error"]
    (short,) = prepare_item({**row, "id": "tiny.wav", "path": str(corpus / "tiny.wav"), "prompt": "Say."}, **kwargs)
    assert short["num_chunks"] == 1 and "too short" in short["error"]


def test_finish_reason_and_sampling_follow_vllm(tiny_af3):
    from flamingo_cli.ray_data import finish_reason, sampling_dict, stop_token_ids

    stop = stop_token_ids(str(tiny_af3))
    assert stop and finish_reason([5, min(stop)], 8, stop) == "stop"  # EOS wins even at the cap
    assert finish_reason([5] * 8, 8, stop) == "length" and finish_reason([5, 6], 8, frozenset()) == "stop"
    # The checkpoint's generation_config.json under flamingo's overrides, as VllmEngine builds them.
    params = sampling_dict(str(tiny_af3), Sampling(top_k=5, max_tokens=8))
    assert params == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 5,
        "repetition_penalty": 1.05,
        "max_tokens": 8,
        "ignore_eos": False,
    }


def test_workers_use_this_interpreter_under_uv_run(monkeypatch):
    """Under ``uv run`` Ray would start workers as ``uv run`` in a copy of the working directory (a fresh
    environment without ray or vllm; they die at import and the job hangs): flamingo turns that off."""
    import ray._private.runtime_env.uv_runtime_env_hook as uv_hook
    from ray._private import ray_constants, worker

    from flamingo_cli.ray_data import _no_uv_worker_hook

    uv_cmd = ["/usr/bin/uv", "run", "--no-sync", "pytest"]
    monkeypatch.setattr(uv_hook, "_get_uv_run_cmdline", lambda: uv_cmd)
    monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", True)
    monkeypatch.delenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", raising=False)
    assert "py_executable" in worker._maybe_modify_runtime_env(None, False)  # what Ray does by default
    _no_uv_worker_hook()
    assert worker._maybe_modify_runtime_env(None, False) is None
    assert os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"  # and worker processes inherit it

    # An operator who wants Ray's uv behaviour keeps it.
    monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", True)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "1")
    _no_uv_worker_hook()
    assert "py_executable" in worker._maybe_modify_runtime_env(None, False)


def _raylet_errors() -> str:
    """The tail of the newest local Ray session's raylet.err: why workers did not start, if they did not."""
    log = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "raylet.err"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no raylet.err)"


def _by_key(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["id"], r["chunk_index"]): r for r in rows}


# The Ray job runs in its own driver process, as a job script would: Ray's threads and C++ handlers stay
# out of the test process, which keeps the shared in-process engine of the other engine tests.
RAY_DRIVER = """
import json, sys

import flamingo_cli
from flamingo_cli.ray_data import RaySettings

if __name__ == "__main__":
    root, out, model = sys.argv[1:4]
    # The same options, by the same names, as the CLI's flags: the same spec, the same run key.
    report = flamingo_cli.caption(
        [root],
        out,
        model=model,
        temperature=0,
        max_tokens=8,
        seed=0,
        chunk_seconds=20,
        quiet=True,
        executor="ray",
        ray_settings=RaySettings(num_cpus=2, batch_size=4),
    )
    doc = {"run_dir": report.run_dir, "stats": report.stats, "info": report.info, "rows": report.rows_written}
    print("RESULT " + json.dumps(doc, default=str))
"""


@pytest.mark.engine
@pytest.mark.serial
def test_ray_data_matches_flamingo_caption_then_resumes(corpus, tiny_af3, tmp_path):
    import flamingo_cli
    from flamingo_cli.ray_data import RaySettings

    ref_out, ray_out, api_out = tmp_path / "ref", tmp_path / "ray", tmp_path / "api"
    # --no-track-summary: the Ray executor makes no track rows (tracks.py), so the local reference makes none
    ref_args = ["--chunk-seconds", "20", "--no-track-summary", *ENGINE_ARGS]
    ref = run_cli(["caption", corpus, "--out", ref_out, "--model", tiny_af3, *ref_args])
    assert ref.status == 1, ref.stderr  # the broken and the too-short file failed
    # The Python API, local executor, same options by the same names: same run key, same rows.
    report = flamingo_cli.caption(
        [corpus],
        api_out,
        model=str(tiny_af3),
        temperature=0,
        max_tokens=8,
        chunk_seconds=20,
        no_track_summary=True,
        quiet=True,
    )
    assert report.failed and report.run_dir.endswith(next(ref_out.iterdir()).name)
    api_by = _by_key(read_rows(api_out))
    assert set(api_by) == set(_by_key(read_rows(ref_out)))
    for key, want in _by_key(read_rows(ref_out)).items():
        assert {c: api_by[key][c] for c in COMPARED} == {c: want[c] for c in COMPARED}, key
        assert api_by[key]["caption"] == want["caption"], key

    driver = tmp_path / "ray_driver.py"
    driver.write_text(RAY_DRIVER)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(driver), str(corpus), str(ray_out), str(tiny_af3)],
            capture_output=True,
            text=True,
            timeout=420,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the Ray job did not finish in {exc.timeout} s; raylet.err:\n{_raylet_errors()}")
    ray_seconds = time.monotonic() - t0
    print(f"Ray Data path: {ray_seconds:.0f} s (Ray start, replica start, 5 chunks)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    ref_rows, ray_rows = read_rows(ref_out), read_rows(ray_out)

    # Same run key, so the same folder name; the same schema, passthrough-free here.
    assert Path(run["run_dir"]).name == next(ref_out.iterdir()).name
    ref_part = sorted(ref_out.glob("run=*/part-*.parquet"))[0]
    ray_parts = sorted(ray_out.glob("run=*/part-*.parquet"))
    assert ray_parts
    ref_schema = pq.read_schema(ref_part).remove_metadata()
    for part in ray_parts:
        assert pq.read_schema(part).remove_metadata() == ref_schema
        assert pq.read_metadata(part).metadata[b"flamingo"]  # run metadata is there too
    assert run["info"]["executor"] == "ray" and run["info"]["sampling_effective"]["temperature"] == 0.0

    # Same rows: ids, chunking, errors, token counts, finish reasons, source fingerprints.
    ref_by, ray_by = _by_key(ref_rows), _by_key(ray_rows)
    assert len(ray_rows) == len(ray_by) == len(ref_rows) == 7, ray_rows  # 1 + 1 + 3 + 1 + 1
    assert set(ray_by) == set(ref_by)
    for key, want in ref_by.items():
        got = ray_by[key]
        assert {c: got[c] for c in COMPARED} == {c: want[c] for c in COMPARED}, key
        assert all(got[c] is None for c in GATE_COLUMNS), key
        assert got["avg_logprob"] is None
        assert got["flags"] == (None if want["flags"] is None else [f for f in want["flags"] if f != "low_confidence"])
    assert ray_by[("broken.wav", 0)]["num_chunks"] == 0 and "broken.wav" in ray_by[("broken.wav", 0)]["error"]
    assert "too short" in ray_by[("tiny.wav", 0)]["error"] and ray_by[("tiny.wav", 0)]["num_chunks"] == 1
    assert [ray_by[("sub/c.ogg", i)]["end_s"] for i in range(3)] == pytest.approx([20.0, 40.0, 45.0], abs=1e-3)
    # Greedy decoding on the same CPU engine build: the same captions.
    assert {k: r["caption"] for k, r in ray_by.items()} == {k: r["caption"] for k, r in ref_by.items()}
    stats = run["stats"]
    assert (stats["chunks_done"], stats["items_failed"], stats["chunks_failed"]) == (5, 1, 1)
    assert run["rows"] == 7

    # The same call again, here: everything is on disk, nothing is captioned, Ray is not even started.
    t0 = time.monotonic()
    again = flamingo_cli.caption(
        [corpus],
        ray_out,
        model=str(tiny_af3),
        temperature=0.0,
        max_tokens=8,
        seed=0,
        chunk_seconds=20.0,
        executor="ray",
        ray_settings=RaySettings(num_cpus=2, batch_size=4),
        quiet=True,
    )
    assert (
        again.rows_written == 0
        and again.stats["items_skipped"] == 5
        and Path(again.run_dir).name == run["run_dir"].split("/")[-1]
    )
    assert len(read_rows(ray_out)) == len(ray_rows)
    assert time.monotonic() - t0 < 30

    # And through the CLI: `flamingo caption --executor ray` reads the same run and finds it complete.
    cli_args = ["caption", corpus, "--out", ray_out, "--model", tiny_af3, "--chunk-seconds", "20", *ENGINE_ARGS]
    res = run_cli([*cli_args, "--seed", "0", "--executor", "ray", "--ray-replicas", "1"])
    assert res.status == 0, res.stderr
    assert len(read_rows(ray_out)) == len(ray_rows)
    assert sorted(p.name for p in ray_out.iterdir()) == [Path(run["run_dir"]).name]
