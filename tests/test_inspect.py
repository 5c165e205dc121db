"""flamingo inspect on datasets written by the real Sink (no engine)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from flamingo_cli.inspect import error_group
from flamingo_cli.records import AudioItem, Chunk, Result, error_result
from flamingo_cli.sink import Sink


def ok(item_id: str, index: int, num_chunks: int, length: float = 30.0, extra=None) -> Result:
    item = AudioItem(id=item_id, path=f"/data/music/{item_id}", extra=extra or {})
    chunk = Chunk(item, index, num_chunks, index * length, (index + 1) * length, None, num_chunks * length)
    return Result(
        chunk=chunk,
        prompt="Describe.",
        caption=f"caption of {item_id} part {index}",
        finish_reason="stop",
        prompt_tokens=800,
        output_tokens=20,
    )


def chunk_error(item_id: str, index: int, num_chunks: int, reason: str) -> Result:
    item = AudioItem(id=item_id, path=f"/data/music/{item_id}")
    chunk = Chunk(item, index, num_chunks, index * 30.0, (index + 1) * 30.0, None, num_chunks * 30.0)
    return Result(chunk=chunk, prompt="Describe.", error=reason)


def bad_file(item_id: str, reason: str) -> Result:
    path = f"/data/music/{item_id}"
    return error_result(AudioItem(id=item_id, path=path), f"{path}: {reason}")


@pytest.fixture()
def dataset(tmp_path):
    out = tmp_path / "out"
    info = {"identity": {"prompt": "Describe.", "sampling": {"temperature": 0.0}}, "family": "af3"}
    with Sink(out, "aaa111", info, model="nvidia/audio-flamingo-3-hf", task="caption", rows_per_part=3) as sink:
        sink.run_info["sampling_effective"] = {"temperature": 0.0, "max_tokens": 64}
        for r in (ok("one.wav", 0, 2), ok("one.wav", 1, 2), ok("two.flac", 0, 1, length=12.0, extra={"split": "dev"})):
            sink.write(r)
        sink.write(bad_file("empty.wav", "empty file (0 bytes)"))
        sink.write(bad_file("sub/empty2.wav", "empty file (0 bytes)"))
        sink.write(bad_file("junk.mp3", "not decodable audio: soundfile: Format not recognised"))
        sink.write(chunk_error("three.wav", 0, 2, "rejected by the engine: prompt of 20001 tokens is too long"))
        sink.write(ok("three.wav", 1, 2))
        sink.write(chunk_error("four.wav", 0, 1, "rejected by the engine: prompt of 20417 tokens is too long"))
    # a retry fixes four.wav: its error row stays on disk but is superseded
    with Sink(out, "aaa111", info, model="nvidia/audio-flamingo-3-hf", task="caption", retry_failed=True) as sink:
        sink.run_info["sampling_effective"] = {"temperature": 0.0, "max_tokens": 64}
        sink.load_index()
        sink.write(ok("four.wav", 0, 1))
    # a second run (another model) in the same folder
    with Sink(out, "bbb222", {"family": "mf"}, model="nvidia/music-flamingo-2601-hf", task="lyrics") as sink:
        sink.write(ok("one.wav", 0, 1, length=200.0))
    return out


def test_inspect_json_numbers(dataset):
    res = run_cli(["inspect", dataset, "--json"])
    assert res.status == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["rows"] == 11 and doc["rows_current"] == 10 and doc["rows_superseded"] == 1
    assert doc["runs"] == 2
    # run aaa111: one, two, four ok; three has a failed chunk; empty, empty2, junk unreadable
    assert doc["items"] == 7 + 1
    assert doc["items_with_errors"] == 4 and doc["items_ok"] == 4
    assert doc["chunks_ok"] == 6
    assert (doc["item_errors"], doc["chunk_errors"]) == (3, 1)
    groups = {g["reason"]: g["count"] for g in doc["errors_by_reason"]}
    assert groups == {
        "empty file (N bytes)": 2,  # two files, one reason: the paths are gone
        "not decodable audio: soundfile: Format not recognised": 1,
        "rejected by the engine: prompt of N tokens is too long": 1,
    }
    example = next(g["example"] for g in doc["errors_by_reason"] if g["count"] == 2)
    assert example.startswith("/data/music/") and example.endswith("empty file (0 bytes)")
    assert doc["audio_hours_captioned"] == pytest.approx((30 * 2 + 12 + 30 + 30 + 200) / 3600)
    assert doc["prompt_tokens"] == 6 * 800 and doc["output_tokens"] == 6 * 20

    runs = {r["run"]: r for r in doc["run_details"]}
    a, b = runs["aaa111"], runs["bbb222"]
    assert (a["model"], a["task"], a["prompt"]) == ("nvidia/audio-flamingo-3-hf", "caption", "Describe.")
    assert a["sampling"] == {"temperature": 0.0, "max_tokens": 64}
    assert a["parts"] == 4 and a["rows"] == 9 and a["items"] == 7  # current rows
    assert (b["model"], b["task"], b["rows"], b["items"]) == ("nvidia/music-flamingo-2601-hf", "lyrics", 1, 1)
    assert a["flamingo_version"] and a["first_row_at"] <= a["last_row_at"]

    assert 1 <= len(doc["samples"]) <= 3
    assert all(s["caption"].startswith("caption of ") for s in doc["samples"])


def test_inspect_text(dataset):
    res = run_cli(["inspect", dataset, "--samples", "2"])
    assert res.status == 0, res.stderr
    for text in (
        "rows",
        "items",
        "errors by reason",
        "empty file (N bytes)",
        "runs",
        "aaa111",
        "bbb222",
        "sample captions",
    ):
        assert text in res.stdout
    assert "caption of " in res.stdout


def test_inspect_refuses_what_is_not_an_output(tmp_path):
    res = run_cli(["inspect", tmp_path / "missing"])
    assert res.status == 2 and "no such directory" in " ".join(res.stderr.split())  # Rich wraps at 80
    (tmp_path / "plain").mkdir()
    res = run_cli(["inspect", tmp_path / "plain"])
    assert res.status == 2 and "not a flamingo output" in " ".join(res.stderr.split())


def test_error_groups_fold_what_varies():
    assert error_group("/a/b c.wav: empty file (0 bytes)", "/a/b c.wav") == "empty file (N bytes)"
    assert error_group("file not found: /x/y.wav", "/x/y.wav") == "file not found: <path>"
    assert error_group("duplicate id 'k.wav' (first at row 3)", "") == "duplicate id '…' (first at row N)"
    assert error_group("broken symlink: /m/n.flac", None) == "broken symlink: <path>"
