"""Issue 16's messages: printed as written (no Rich markup), in words, and never wrapped when meant to be copied."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_audio, read_rows, run_cli

from flamingo_cli.env import Environment
from flamingo_cli.models import AF3


def test_environment_prints_brackets_as_written() -> None:
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO())
    env.error("noprompt.toml: [task] lacks prompt")
    env.warn("bad.toml: unknown [sampling] keys ['foo']")
    env.info("[bold]not bold[/] and [red]")
    assert env.stderr.getvalue().splitlines() == [
        "error: noprompt.toml: [task] lacks prompt",
        "warning: bad.toml: unknown [sampling] keys ['foo']",
        "[bold]not bold[/] and [red]",
    ]


def test_environment_prints_a_non_utf8_name_escaped() -> None:
    import os

    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, like a UTF-8 pipe
    env = Environment(stdout=io.StringIO(), stderr=stderr)
    name = os.fsdecode(b"caf\xe9.wav")
    env.error(f"{name}: not decodable audio")
    stderr.flush()
    assert stderr.buffer.getvalue() == b"error: caf\\xe9.wav: not decodable audio\n"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[task]\nmodel = "af3"\n', "noprompt.toml: [task] lacks prompt"),
        (
            '[task]\nmodel = "af3"\nprompt = "Describe."\n[sampling]\nfoo = 1\n',
            "noprompt.toml: unknown [sampling] keys ['foo']",
        ),
    ],
)
def test_cli_preset_errors_keep_bracketed_names(tmp_path: Path, toml: str, expected: str) -> None:
    preset = tmp_path / "noprompt.toml"
    preset.write_text(toml)
    make_audio(tmp_path / "in" / "a.wav", 1.0)
    r = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "out", "--task", preset])
    assert r.status == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and not read_rows(tmp_path / "out")


def test_cli_gpus_0_on_a_host_without_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    make_audio(tmp_path / "in" / "a.wav", 1.0)
    r = run_cli(["caption", tmp_path / "in", "--out", tmp_path / "out", "--gpus", "0"])
    assert r.status == 2
    assert "--gpus '0': no GPUs visible on this host (asked for 0)" in r.stderr
    assert "0..-1" not in r.stderr


def test_presets_in_a_pipe_are_one_unwrapped_line_each() -> None:
    from flamingo_cli.config import list_presets

    r = run_cli(["presets"])
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "task\tmodel\tsampling\tfile\tprompt"
    presets = list_presets()
    assert len(lines) == len(presets) + 1
    by_name = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    for p in presets:
        _, model, _, source, prompt = by_name[p.name]
        assert (model, source) == (p.model, str(p.source))  # the whole path, never cut with "…"
        assert prompt == p.prompt.replace("\n", "\\n")
    assert any(len(line) > 80 for line in lines)  # long prompts stay on their line


def check_demo(workdir: Path) -> None:
    """The demo's promises: a chunked track, an m4a, a resumed second run, a copyable last line."""
    from flamingo_cli.demo import DEMO_CHUNK_S, DEMO_LONG_S

    assert DEMO_LONG_S > DEMO_CHUNK_S and AF3.max_audio_s >= DEMO_LONG_S  # chunked by the option, not the cap
    r = run_cli(["demo", "--workdir", workdir])
    assert r.status == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "Real models on a GPU host: flamingo caption DIR --out OUT --model nvidia/audio-flamingo-3-hf"
    assert f"chunked (--chunk-seconds {DEMO_CHUNK_S}): noise-16k.wav" in lines
    second = json.loads((workdir / "second-run.json").read_text())
    assert second["status"] == "ok" and not second["rows_written"]
    assert second["reason"] == "nothing to do"  # planned before the engine: nothing left, no model loaded
    assert lines[-2] == (
        f"second run: nothing to do (4 files, 7 rows already in {workdir / 'out'}; 0 new rows): resume works"
    )
    rows = read_rows(workdir / "out")
    assert len(rows) == 7 and all(row["error"] is None for row in rows)
    assert "voice-memo.m4a" in {row["id"] for row in rows}
    # The chunked file: three chunk rows and its track row (one caption of the whole, tracks.py).
    noise = sorted((row["chunk_index"], row["level"]) for row in rows if row["id"] == "noise-16k.wav")
    assert noise == [(-1, "track"), (0, "chunk"), (1, "chunk"), (2, "chunk")]


def test_demo_shows_chunks_and_a_resumed_second_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_engine: Any
) -> None:
    """The demo's own logic with the fake engine (instant); the real engine runs in the test below."""
    from test_reliability import FakeEngine

    import flamingo_cli.prompts

    engine = use_engine(FakeEngine())
    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    check_demo(tmp_path)
    assert len(engine.requests) == 7  # 6 audio + 1 track request; the second run captioned nothing


@pytest.mark.engine
def test_demo_with_the_real_engine(tmp_path: Path) -> None:
    """The real demo (tiny random-weight AF3 on the CPU engine)."""
    check_demo(tmp_path)
