"""Honest throughput in the summary (issue 28): the engine's start is not generation time.

A run whose engine start takes measurable time (``get_engine`` replaced by one that sleeps, then hands
over a fake engine on two "GPUs") and a run on an injected engine (no start): ``generation_s`` runs from
the engine being ready to its last result, the ``*_per_generation_s`` rates divide by it, the ``done``
line of ``--log-file`` carries the same numbers as ``--summary-json``."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import make_audio
from fakes import FakeEngine
from rich.console import Console

import flamingo_cli
from flamingo_cli.env import Environment
from flamingo_cli.progress import Progress
from flamingo_cli.summary import TIMING_FIELDS

START_S = 0.6  # the fake engine's start
N_FILES = 4


@pytest.fixture
def audio(tmp_path: Path) -> Path:
    folder = tmp_path / "audio"
    for i in range(N_FILES):
        make_audio(folder / f"f{i}.wav", 1.0, seed=i)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import flamingo_cli.prompts

    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def slow_engine() -> FakeEngine:
    engine = FakeEngine()
    engine.delay = 0.05  # per request: generation takes measurable time too
    return engine


def caption(audio: Path, tmp_path: Path, name: str, engine: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """One run; its summary document (as written to --summary-json) and its ``done`` log line's fields."""
    summary, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO(), stdout_isatty=False, stderr_isatty=False)
    report = flamingo_cli.caption(
        [str(audio)], str(tmp_path / "out"), engine=engine, env=env, model="af3", temperature=0, max_tokens=8,
        quiet=True, summary_json=str(summary), log_file=str(log),
    )  # fmt: skip
    doc = json.loads(summary.read_text())
    assert doc == json.loads(json.dumps(report.summary))
    done = log.read_text().splitlines()[-1]
    assert " [flamingo] done status=" in done
    fields = dict(f.split("=", 1) for f in done.split(" [flamingo] done ", 1)[1].split(" ") if "=" in f)
    return doc, fields


def check_consistent(doc: dict[str, Any], fields: dict[str, str]) -> None:
    """Rates are the counts over generation_s, and the done line says what the document says."""
    gen = doc["generation_s"]
    assert gen > 0
    assert doc["rows_per_generation_s"] == pytest.approx(doc["rows_written"] / gen, rel=1e-3)
    assert doc["windows_per_generation_s"] == pytest.approx(doc["windows"] / gen, rel=1e-3)
    assert doc["audio_s_per_generation_s"] == pytest.approx(doc["audio_hours"] * 3600 / gen, rel=1e-3)
    assert gen < doc["processing_s"] <= doc["wall_s"]
    assert doc["rows_per_generation_s"] > doc["rows_written"] / doc["processing_s"]
    assert doc["windows_per_generation_s"] > doc["windows_per_s"]
    assert doc["time_to_first_row_s"] is not None and 0 < doc["time_to_first_row_s"] <= doc["wall_s"]
    for key in TIMING_FIELDS:
        assert json.loads(fields[key]) == doc[key], key
    assert float(fields["processing_s"]) == pytest.approx(doc["processing_s"], abs=0.051)


def test_a_started_engine_is_not_generation_time(audio, tmp_path, monkeypatch) -> None:
    import flamingo_cli.launch

    started: list[Any] = []

    def get_engine(config: Any) -> FakeEngine:
        time.sleep(START_S)  # loading the model
        engine = slow_engine()
        engine.config = SimpleNamespace(devices=("0,1", "0,1"))  # two replicas sharing a tensor-parallel pair
        started.append(engine)
        return engine

    monkeypatch.setattr(flamingo_cli.launch, "get_engine", get_engine)
    doc, fields = caption(audio, tmp_path, "started")
    assert len(started) == 1 and len(started[0].requests) == N_FILES
    assert doc["status"] == "ok" and doc["rows_written"] == N_FILES and doc["windows"] == N_FILES
    check_consistent(doc, fields)
    assert START_S <= doc["engine_start_s"] < START_S + 1.0
    assert doc["time_to_first_row_s"] >= doc["engine_start_s"]
    assert doc["generation_s"] <= doc["processing_s"] - doc["engine_start_s"]
    assert doc["gpus"] == 2
    gpu_hours = (doc["engine_start_s"] + doc["generation_s"]) * 2 / 3600
    assert doc["audio_hours_per_gpu_hour"] == pytest.approx(doc["audio_hours"] / gpu_hours, rel=1e-3)

    # What a person sees at the end: the same numbers in the table.
    console = Console(file=io.StringIO(), width=120, record=True, force_terminal=False)
    console.print(Progress.summary_table(doc))
    table = console.export_text()
    assert f"{doc['generation_s']:.1f} s · {doc['rows_per_generation_s']:.1f} rows/s" in table
    assert "first row after" in table and "audio h per GPU h" in table and "(2 GPUs)" in table

    # A second night with nothing to do: no engine, nothing generated, no row.
    monkeypatch.setattr(flamingo_cli.launch, "get_engine", lambda config: pytest.fail("no engine is needed"))
    idle, fields = caption(audio, tmp_path, "idle")
    assert idle["reason"] == "nothing to do" and idle["engine_start_s"] is None
    assert idle["generation_s"] == 0.0 and idle["time_to_first_row_s"] is None
    assert idle["rows_per_generation_s"] == idle["windows_per_generation_s"] == idle["audio_s_per_generation_s"] == 0
    assert idle["gpus"] is None and idle["audio_hours_per_gpu_hour"] is None
    assert {k: fields[k] for k in ("engine_start_s", "generation_s", "audio_hours_per_gpu_hour")} == {
        "engine_start_s": "null",
        "generation_s": "0.0",
        "audio_hours_per_gpu_hour": "null",
    }


def test_an_injected_engine_has_no_start(audio, tmp_path) -> None:
    engine = slow_engine()
    doc, fields = caption(audio, tmp_path, "injected", engine=engine)
    assert doc["status"] == "ok" and len(engine.requests) == N_FILES
    check_consistent(doc, fields)
    assert doc["engine_start_s"] is None and fields["engine_start_s"] == "null"
    # No GPUs it names: no GPU hours to divide by.
    assert doc["gpus"] is None and doc["audio_hours_per_gpu_hour"] is None
