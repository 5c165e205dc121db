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
