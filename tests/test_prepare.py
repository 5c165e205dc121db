"""The prepare-an-item stage both executors call: decode, chunks, requests, or the item's one error."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_audio

from flamingo_cli.models import AF3
from flamingo_cli.prepare import prepare
from flamingo_cli.prompts import PromptBuilder
from flamingo_cli.records import AudioItem


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(AF3)


def _item(path: Path) -> AudioItem:
    return AudioItem(id=path.name, path=str(path))


def test_chunks_left_to_caption_become_requests_in_order(tmp_path: Path, builder: PromptBuilder) -> None:
    item = _item(make_audio(tmp_path / "a.wav", 45.0))
    ready = prepare(item, max_chunk_s=600.0, chunk_s=20.0, overlap_s=0.0, prompts=builder, prompt="Say.", skip={1})
    assert ready.error is None
    assert [(r.chunk.index, r.chunk.num_chunks) for r in ready.requests] == [(0, 3), (2, 3)]
    assert all(r.prompt == "Say." and r.text == builder.text("Say.") for r in ready.requests)
    assert [len(r.chunk.samples) for r in ready.requests] == [20 * 16000, 5 * 16000]


def test_a_chunk_too_short_for_a_sound_token_carries_its_error(tmp_path: Path, builder: PromptBuilder) -> None:
    item = _item(make_audio(tmp_path / "tiny.wav", 0.005))
    (request,) = prepare(item, max_chunk_s=600.0, chunk_s=None, overlap_s=0.0, prompts=builder, prompt="Say.").requests
    assert request.chunk.num_chunks == 1 and "too short" in (request.chunk.error or "")


def test_an_item_that_cannot_be_decoded_or_chunked_gives_its_reason(tmp_path: Path, builder: PromptBuilder) -> None:
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"this is not audio")
    ready = prepare(_item(broken), max_chunk_s=600.0, chunk_s=None, overlap_s=0.0, prompts=builder, prompt="Say.")
    assert not ready.requests and str(broken) in (ready.error or "") and "not decodable audio" in (ready.error or "")

    good = _item(make_audio(tmp_path / "a.wav", 2.0))
    ready = prepare(good, max_chunk_s=600.0, chunk_s=None, overlap_s=1.0, prompts=builder, prompt="Say.")
    assert (
        not ready.requests
        and ready.error == f"{good.path}: overlap_s needs chunk_s (an overlap only applies to fixed-length chunks)"
    )


def test_an_unexpected_decode_failure_is_the_items_error_not_a_crash(
    tmp_path: Path, builder: PromptBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flamingo_cli.prepare

    def no_memory(item: AudioItem) -> None:
        raise MemoryError("out of memory")

    monkeypatch.setattr(flamingo_cli.prepare, "decode", no_memory)
    item = _item(tmp_path / "a.wav")
    ready = prepare(item, max_chunk_s=600.0, chunk_s=None, overlap_s=0.0, prompts=builder, prompt="Say.")
    assert ready.error == f"{item.path}: unexpected decode error: MemoryError: out of memory"
