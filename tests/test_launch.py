"""The engine cache: reuse an engine that fits, grow one that does not, keep at most a few alive."""

from __future__ import annotations

import pytest

from flamingo_cli import launch
from flamingo_cli.engine import EngineConfig
from flamingo_cli.models import AF3, MF


class _Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config, self.llm, self.closed = config, object(), False

    def close(self) -> None:
        self.closed, self.llm = True, None


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(launch, "VllmEngine", _Engine)  # the vLLM boundary: no model loads here
    monkeypatch.setattr(launch, "_CACHE", {})
    monkeypatch.setenv("FLAMINGO_MAX_ENGINES", "2")
    return launch


def test_an_engine_that_fits_is_reused_and_a_bigger_one_replaces_it(cache) -> None:
    small = cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=30.0))
    assert cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=30.0)) is small
    big = cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=600.0))
    assert big is not small and small.closed
    assert cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=60.0)) is big  # fits


def test_at_most_max_engines_stay_alive_least_recently_used_goes(cache) -> None:
    a = cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=600.0))
    b = cache.get_engine(EngineConfig(model="b", family=MF, max_chunk_s=1200.0))
    assert cache.get_engine(EngineConfig(model="a", family=AF3, max_chunk_s=600.0)) is a  # a is now the newest
    c = cache.get_engine(EngineConfig(model="c", family=AF3, max_chunk_s=600.0))
    assert b.closed and not a.closed and not c.closed
    assert sum(len(v) for v in cache._CACHE.values()) == 2


# A script without a main guard that spawns a process at module level, as vLLM does inside caption().
_SPAWNING_SCRIPT = """\
import multiprocessing, os
from flamingo_cli.launch import main_script_kept_out, refuse_to_rerun_in_a_spawned_child

print("script body runs", flush=True)
refuse_to_rerun_in_a_spawned_child("flamingo_cli.caption()")
child = multiprocessing.get_context("spawn").Process(target=os.getpid)
with {context}:
    child.start()
child.join()
print("child exit", child.exitcode, flush=True)
"""


@pytest.mark.parametrize("kept_out", [True, False], ids=["engine-start", "other-spawn"])
def test_spawned_engine_processes_do_not_rerun_the_callers_script(tmp_path, kept_out: bool) -> None:
    """Engine processes start under main_script_kept_out: the script runs once. A process spawned
    otherwise re-runs it, and a caption() there stops that process with one line saying what to add."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(_SPAWNING_SCRIPT.format(context="main_script_kept_out()" if kept_out else "open(__file__)"))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if kept_out:
        assert proc.stdout.splitlines() == ["script body runs", "child exit 0"], proc.stdout + proc.stderr
        assert proc.stderr == ""
    else:
        assert proc.stdout.splitlines() == ["script body runs", "script body runs", "child exit 2"], proc.stdout
        assert proc.stderr.strip().splitlines() == [
            "flamingo: flamingo_cli.caption() ran again in a process that multiprocessing spawned, which re-runs "
            'your script; put the call under `if __name__ == "__main__":`'
        ]


def test_keeping_the_main_script_out_nests_and_restores() -> None:
    from multiprocessing import spawn

    original = spawn.get_preparation_data
    with launch.main_script_kept_out():
        with launch.main_script_kept_out():
            assert spawn.get_preparation_data is not original
        data = spawn.get_preparation_data("x")
        assert spawn.get_preparation_data is not original
        assert "init_main_from_path" not in data and "init_main_from_name" not in data and data["name"] == "x"
    assert spawn.get_preparation_data is original
