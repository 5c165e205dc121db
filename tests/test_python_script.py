"""The README's Python API example as users run it: a file run with ``python file.py``, no
``if __name__ == "__main__":`` guard, on the real vLLM engine (tiny AF3 checkpoint, CPU)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import make_audio, read_rows

pytestmark = pytest.mark.engine


def test_a_script_without_a_main_guard_captions(tmp_path, tiny_af3):
    """vLLM's engine core (and flamingo's replicas) are spawned processes; spawning re-runs the parent's
    main script unless flamingo keeps it out of them, and a second ``caption`` in the engine core would
    meet the run's lock. The script must run once, exit 0 and write its rows."""
    for i in range(2):
        make_audio(tmp_path / "audio" / f"clip{i}.wav", 2.0, seed=i)
    script = tmp_path / "caption_folder.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import flamingo_cli

            print("script body runs", flush=True)
            report = flamingo_cli.caption(
                [{str(tmp_path / "audio")!r}], {str(tmp_path / "captions")!r},
                model={str(tiny_af3)!r}, temperature=0, max_tokens=8, quiet=True,
            )
            print("status", int(report.status), "rows", report.rows_written, flush=True)
            """
        ),
        encoding="utf-8",
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("script body runs") == 1, proc.stdout
    assert "status 0 rows 2" in proc.stdout, proc.stdout + proc.stderr
    rows = read_rows(tmp_path / "captions")
    assert sorted(r["id"] for r in rows) == ["clip0.wav", "clip1.wav"]
    assert all(r["error"] is None and r["caption"] is not None for r in rows)
