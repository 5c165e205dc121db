"""Shared fixtures: tiny random-weight checkpoints, generated audio, an in-process CLI runner.

Engine tests (marked ``engine``) run the real vLLM engine on CPU. An engine takes ~1 min to start
there, so every test uses the same engine options (ENGINE_ARGS) and flamingo's in-process engine
cache hands them the same engine.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

# The tiny checkpoints' KV cache is ~1 KB a token (fp32, 2 layers, 1 KV head): 1 GiB holds a million
# tokens, the longest prompt (AF-Next at its 1800-s cap) ~46 thousand. vLLM's CPU backend allocates it
# whole in each engine, and two test workers keep up to four engines (scripts/test.sh).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# The options every engine-backed CLI test passes, so they share one engine per model.
ENGINE_ARGS = ["--temperature", "0", "--max-tokens", "8", "--quiet"]


@pytest.fixture(scope="session", autouse=True)
def _engines_closed_at_session_end():
    """The cached engines close while pytest's streams are open: at interpreter exit (flamingo's atexit)
    vLLM's shutdown logged into a stream pytest had closed ("Logging error", a traceback each)."""
    yield
    import sys

    launch = sys.modules.get("flamingo_cli.launch")  # only a session that started an engine loaded it
    if launch is not None:
        launch.close_all()


def cli_engine(ckpt: str | Path):
    """The engine the CLI tests' runs (ENGINE_ARGS) get for ``ckpt``, from the same cache: a test that
    drives an engine directly shares it instead of starting another (a minute or more on CPU)."""
    from flamingo_cli.launch import get_engine
    from flamingo_cli.spec import CaptionSpec

    spec = CaptionSpec.build(["."], "unused-out", model=str(ckpt), temperature=0.0, max_tokens=8, quiet=True)
    return get_engine(spec.engine_config(None))


@pytest.fixture(scope="session")
def tiny_af3(tmp_path_factory) -> Path:
    from flamingo_cli.checkpoints import build_checkpoint

    return build_checkpoint("af3", tmp_path_factory.mktemp("ckpt") / "tiny-af3")


@pytest.fixture(scope="session")
def tiny_mf(tmp_path_factory) -> Path:
    from flamingo_cli.checkpoints import build_checkpoint

    return build_checkpoint("mf", tmp_path_factory.mktemp("ckpt") / "tiny-mf")


def _tiny(tmp_path_factory, kind: str) -> Path:
    from flamingo_cli.checkpoints import build_checkpoint

    return build_checkpoint(kind, tmp_path_factory.mktemp("ckpt") / f"tiny-{kind}")


@pytest.fixture(scope="session")
def tiny_mf_think(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "mf-think")


@pytest.fixture(scope="session")
def tiny_afnext(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "af-next")


@pytest.fixture(scope="session")
def tiny_afnext_think(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "af-next-think")


@pytest.fixture(scope="session")
def tiny_afnext_captioner(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory, "af-next-captioner")


def make_audio(
    path: Path, seconds: float, sr: int = 16000, channels: int = 1, seed: int = 0, subtype: str | None = None
) -> Path:
    """A tone plus a little noise, written in the format the suffix names."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = np.arange(n) / sr
    x = (0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)
    data = np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return path


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str


# The engine run_cli hands flamingo when a test gives none (the ``use_engine`` fixture sets it).
_ENGINE: list = [None]


@pytest.fixture
def use_engine():
    """``use_engine(engine)``: every run_cli of this test runs on ``engine`` (injected, not patched)."""

    def use(engine):
        _ENGINE[0] = engine
        return engine

    yield use
    _ENGINE[0] = None


def run_cli(args: list[str], engine=None) -> CliResult:
    """Call flamingo's main() in-process with captured, non-TTY streams (and an injected engine)."""
    from flamingo_cli.cli import main
    from flamingo_cli.env import Environment

    out, err = io.StringIO(), io.StringIO()
    env = Environment(stdout=out, stderr=err, engine=engine if engine is not None else _ENGINE[0])
    status = main([str(a) for a in args], env=env)
    return CliResult(int(status), out.getvalue(), err.getvalue())


def read_rows(out: Path) -> list[dict]:
    import pyarrow.dataset as ds

    if not out.exists():
        return []
    return ds.dataset(out, partitioning="hive", format="parquet").to_table().to_pylist()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, use_engine: Any) -> Any:
    from fakes import FakeEngine

    import flamingo_cli.prompts

    engine = use_engine(FakeEngine())
    monkeypatch.setattr(flamingo_cli.prompts, "load_chat_template", lambda model: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return engine


# Engines are cached per model in this process, at most FLAMINGO_MAX_ENGINES (2) at a time: the modules
# that start engines for the other family members run last, so the AF3 and MF engines most modules share
# are started once instead of after every eviction (each start is a minute or more on CPU).
LAST_MODULES = ("test_parity.py", "test_family_e2e.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LAST_MODULES.index(name) + 1 if name in LAST_MODULES else 0

    items.sort(key=rank)  # stable: the order inside each group is pytest's own
