"""Tests for flamingo_cli.sources: directory scans, manifests, bad rows and fail-fast input checks."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flamingo_cli.manifests import SourceError
from flamingo_cli.sources import DEFAULT_EXTENSIONS, check_inputs, iter_items


def touch(path: Path, data: bytes = b"RIFF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ids(items) -> list[str]:
    return [i.id for i in items]


# --- directories -----------------------------------------------------------------------------------------


def test_recursive_scan_is_sorted_and_deterministic(tmp_path: Path) -> None:
    for rel in ["b.wav", "a/z.flac", "a/b/c.mp3", "a-b.wav", "A.wav", "a.wav", "notes.md", "c/d/e/f.ogg"]:
        touch(tmp_path / rel)
    items = list(iter_items([tmp_path]))
    got = ids(items)
    # Sorted by full relative path in plain code-point order ("A" < "a", "a-b" < "a/").
    assert got == ["A.wav", "a-b.wav", "a.wav", "a/b/c.mp3", "a/z.flac", "b.wav", "c/d/e/f.ogg"]
    assert got == sorted(got)
    assert ids(iter_items([tmp_path])) == got
    first = items[0]
    assert first.path == os.path.join(str(tmp_path), "A.wav")
    assert os.path.isabs(first.path)
    assert first.origin == str(tmp_path)
    assert all(i.error is None and i.offset == 0.0 and i.duration is None for i in items)


def test_relative_dir_input_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "data" / "x.wav")
    monkeypatch.chdir(tmp_path)
    [item] = iter_items(["data"])
    assert item.id == "x.wav"
    assert item.path == str(tmp_path / "data" / "x.wav")


def test_extension_filter_and_case_insensitivity(tmp_path: Path) -> None:
    for name in ["a.WAV", "b.wav", "c.Flac", "d.mp3", "e.txt", "f"]:
        touch(tmp_path / name)
    assert ids(iter_items([tmp_path])) == ["a.WAV", "b.wav", "c.Flac", "d.mp3"]
    assert ids(iter_items([tmp_path], extensions={".wav"})) == ["a.WAV", "b.wav"]
    assert ids(iter_items([tmp_path], extensions={"WAV", "flac"})) == ["a.WAV", "b.wav", "c.Flac"]
    assert ".wav" in DEFAULT_EXTENSIONS and ".opus" in DEFAULT_EXTENSIONS
    with pytest.raises(ValueError):
        list(iter_items([tmp_path], extensions={""}))


def test_hidden_files_and_dirs_are_skipped(tmp_path: Path) -> None:
    touch(tmp_path / ".hidden.wav")
    touch(tmp_path / ".cache" / "x.wav")
    touch(tmp_path / "sub" / ".y.wav")
    touch(tmp_path / "sub" / "y.wav")
    assert ids(iter_items([tmp_path])) == ["sub/y.wav"]


def test_hidden_root_dir_is_still_scanned(tmp_path: Path) -> None:
    touch(tmp_path / ".data" / "x.wav")
    assert ids(iter_items([tmp_path / ".data"])) == ["x.wav"]


def test_symlinked_dirs_are_followed_and_loops_terminate(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "a" / "x.wav")
    os.symlink(root, root / "a" / "loop")  # points back at an ancestor
    os.symlink(root / "a", root / "a" / "self")
    outside = tmp_path / "outside"
    touch(outside / "o.wav")
    os.symlink(outside, root / "linked")
    items = list(iter_items([root]))
    assert ids(items) == ["a/x.wav", "linked/o.wav"]
    # Paths keep the symlink (not resolved).
    assert items[1].path == str(root / "linked" / "o.wav")


def test_broken_symlink_and_directory_named_like_audio_give_error_items(tmp_path: Path) -> None:
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "dangling.wav")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.txt")  # not audio: not reported
    touch(tmp_path / "take.wav" / "inner.flac")
    touch(tmp_path / "ok.wav")
    items = {i.id: i for i in iter_items([tmp_path])}
    assert list(items) == ["dangling.wav", "ok.wav", "take.wav", "take.wav/inner.flac"]
    assert items["dangling.wav"].error == f"broken symlink: {tmp_path / 'dangling.wav'}"
    assert items["take.wav"].error == f"is a directory: {tmp_path / 'take.wav'}"
    assert items["ok.wav"].error is None
    assert items["take.wav/inner.flac"].error is None


def test_unicode_space_and_newline_names(tmp_path: Path) -> None:
    names = ["straße café.wav", "日本語/音.flac", "with\nnewline.wav", " lead space.mp3", "tab\tname.ogg"]
    for name in names:
        touch(tmp_path / name)
    items = list(iter_items([tmp_path]))
    assert sorted(ids(items)) == sorted(names)
    for item in items:
        assert item.path == os.path.join(str(tmp_path), item.id)
        assert os.path.exists(item.path)


def test_single_files_use_their_name_as_id(tmp_path: Path) -> None:
    a = touch(tmp_path / "sub" / "song.mp3")
    b = touch(tmp_path / "raw.bin")  # unknown extension, still taken as given
    items = list(iter_items([a, str(b)]))
    assert ids(items) == ["song.mp3", "raw.bin"]
    assert items[0].path == str(a) and items[0].origin == str(a)


def test_inputs_stream_in_order_and_lazily(tmp_path: Path) -> None:
    touch(tmp_path / "d" / "x.wav")
    touch(tmp_path / "one.wav")
    it = iter_items([tmp_path / "d", tmp_path / "one.wav", tmp_path / "missing.wav"])
    assert next(it).id == "x.wav"
    assert next(it).id == "one.wav"
    with pytest.raises(SourceError, match=r"missing\.wav"):
        next(it)


# --- manifests -------------------------------------------------------------------------------------------


def test_txt_manifest_skips_blanks_and_comments(tmp_path: Path) -> None:
    touch(tmp_path / "audio" / "a.wav")
    touch(tmp_path / "b.wav")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# comment\n\naudio/a.wav\r\n  {tmp_path / 'b.wav'}  \n   # indented comment\n")
    items = list(iter_items([manifest]))
    assert ids(items) == ["audio/a.wav", str(tmp_path / "b.wav")]
    assert items[0].path == str(tmp_path / "audio" / "a.wav")
    assert items[0].origin == f"{manifest}:3"
    assert items[1].origin == f"{manifest}:4"
    assert all(i.error is None for i in items)


def test_relative_paths_resolve_against_manifest_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path / "lists" / "clips" / "a.wav")
    (tmp_path / "lists" / "m.txt").write_text("clips/a.wav\n../outside.wav\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a, b = iter_items([Path("..") / "lists" / "m.txt"])
    assert a.path == str(tmp_path / "lists" / "clips" / "a.wav") and a.error is None
    assert b.path == str(tmp_path / "outside.wav")
    assert b.error == f"file not found: {tmp_path / 'outside.wav'}"


def test_tilde_expands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    touch(tmp_path / "music" / "a.wav")
    manifest = tmp_path / "m.txt"
    manifest.write_text("~/music/a.wav\n")
    [item] = iter_items(["~/m.txt"])
    assert item.id == "~/music/a.wav"
    assert item.path == str(tmp_path / "music" / "a.wav")
    assert item.error is None


def test_csv_manifest_with_known_and_passthrough_columns(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    touch(tmp_path / "b.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        'id,path,prompt,offset,duration,genre,bpm\nk1,a.wav,"Describe, briefly.",1.5,10,rock,120\nk2,b.wav,,,,jazz,\n'
    )
    k1, k2 = iter_items([manifest])
    assert (k1.id, k1.path, k1.prompt, k1.offset, k1.duration) == (
        "k1",
        str(tmp_path / "a.wav"),
        "Describe, briefly.",
        1.5,
        10.0,
    )
    assert k1.extra == {"genre": "rock", "bpm": "120"}
    assert k1.origin == f"{manifest}:2" and k1.error is None
    assert (k2.id, k2.prompt, k2.offset, k2.duration) == ("k2", None, 0.0, None)
    assert k2.extra == {"genre": "jazz", "bpm": ""}


def test_csv_with_bom_and_tsv(tmp_path: Path) -> None:
    touch(tmp_path / "a b.wav")
    csv_manifest = tmp_path / "bom.csv"
    csv_manifest.write_bytes("\ufeffpath,lang\na b.wav,fr\n".encode())
    [item] = iter_items([csv_manifest])
    assert item.id == "a b.wav" and item.error is None and item.extra == {"lang": "fr"}

    tsv = tmp_path / "m.tsv"
    tsv.write_text("file\tnote\na b.wav\thas, comma\n")
    [item] = iter_items([tsv])
    assert item.path == str(tmp_path / "a b.wav") and item.extra == {"note": "has, comma"}


def test_jsonl_manifest_path_and_nemo_audio_filepath(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    touch(tmp_path / "b.wav")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"path": "a.wav", "prompt": "What instruments?", "tags": ["x", 1]}) + "\n")
    [item] = iter_items([plain])
    assert item.id == "a.wav" and item.prompt == "What instruments?" and item.extra == {"tags": ["x", 1]}

    nemo = tmp_path / "nemo.jsonl"
    rows = [
        {"audio_filepath": "b.wav", "offset": 0, "duration": 30.0, "text": "hi"},
        {"audio_filepath": "b.wav", "offset": 30, "duration": 30.0, "text": "there"},
    ]
    nemo.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = iter_items([nemo])
    assert (first.id, second.id) == ("b.wav@0.0", "b.wav@30.0")
    assert (second.offset, second.duration) == (30.0, 30.0)
    assert second.extra == {"text": "there"}
    assert first.error is None and second.error is None


def test_parquet_manifest_python_values(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    manifest = tmp_path / "m.parquet"
    table = pa.table(
        {
            "path": ["a.wav", "missing.wav"],
            "id": [7, None],
            "score": [0.5, None],
            "tags": [["a"], []],
        }
    )
    pq.write_table(table, manifest)
    a, b = iter_items([manifest])
    assert (a.id, a.error, a.extra) == ("7", None, {"score": 0.5, "tags": ["a"]})
    assert a.origin == f"{manifest}:1"
    assert b.id == "missing.wav"
    assert b.error == f"file not found: {tmp_path / 'missing.wav'}"


def test_parquet_manifest_streams_many_rows(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    n = 10_000
    manifest = tmp_path / "big.parquet"
    pq.write_table(pa.table({"path": ["a.wav"] * n, "id": [f"r{i}" for i in range(n)]}), manifest, row_group_size=1000)
    start = time.perf_counter()
    items = list(iter_items([manifest]))
    assert time.perf_counter() - start < 10
    assert len(items) == n
    assert items[-1].id == f"r{n - 1}" and items[-1].origin == f"{manifest}:{n}"
    assert all(i.error is None for i in items)
    assert ids(itertools.islice(iter_items([manifest]), 3)) == ["r0", "r1", "r2"]


def test_parquet_embedded_audio_column_is_read_as_a_dataset(tmp_path: Path) -> None:
    """A Parquet file whose audio column holds bytes/path structs (HF's Audio) is a dataset input, not a
    manifest: its rows carry the bytes for flamingo's decoder."""
    manifest = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"audio": [{"bytes": b"x", "path": "a.wav"}], "lang": ["en"]}), manifest)
    check_inputs([manifest])
    (item,) = iter_items([manifest])
    assert (item.id, item.data, dict(item.extra), item.error) == ("train/0", b"x", {"lang": "en"}, None)


def test_duplicate_ids_flag_second_and_later(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\na.wav,x\na.wav,y\na.wav,x\na.wav,x\n")
    items = list(iter_items([manifest]))
    assert ids(items) == ["x", "y", "x", "x"]
    dup = "duplicate id 'x' (first at row 2)"
    assert [i.error for i in items] == [None, None, dup, dup]
    txt = tmp_path / "m.txt"
    txt.write_text("a.wav\na.wav\n")
    assert [i.error for i in iter_items([txt])] == [None, "duplicate id 'a.wav' (first at row 1)"]


def test_bad_rows_become_error_items_and_stream_continues(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "\n".join(
            [
                json.dumps({"path": "a.wav", "id": "good1"}),
                "{not json",
                json.dumps({"path": "a.wav", "offset": "abc"}),
                json.dumps({"path": "a.wav", "offset": -1}),
                json.dumps({"path": "a.wav", "duration": 0}),
                json.dumps({"path": ""}),
                json.dumps({"path": None, "id": "nopath"}),
                json.dumps([1, 2]),
                json.dumps({"other": "a.wav"}),
                json.dumps({"path": "a.wav", "id": "good2"}),
            ]
        )
        + "\n"
    )
    items = list(iter_items([manifest]))
    assert len(items) == 10
    assert [i.id for i in items] == [
        "good1",
        "m.jsonl:row2",
        "m.jsonl:row3",
        "m.jsonl:row4",
        "m.jsonl:row5",
        "m.jsonl:row6",
        "nopath",
        "m.jsonl:row8",
        "m.jsonl:row9",
        "good2",
    ]
    assert [i.origin for i in items] == [f"{manifest}:{n}" for n in range(1, 11)]
    errors = [i.error for i in items]
    assert errors[0] is None and errors[-1] is None
    assert errors[1].startswith("invalid JSON")
    assert errors[2] == "offset is not a number: 'abc'"
    assert errors[3] == "offset must be a finite number >= 0: -1"
    assert errors[4] == "duration must be > 0"
    assert errors[5] == errors[6] == "empty path"
    assert errors[7] == "not a JSON object (list)"
    assert errors[8].startswith("no path field")


def test_bad_csv_rows(tmp_path: Path) -> None:
    touch(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,prompt\na.wav,ok\n,empty\na.wav,unquoted, comma\n\xff\xfe.wav,x\nb.wav,x\n")
    items = list(iter_items([manifest]))
    assert [i.error for i in items] == [
        None,
        "empty path",
        "expected 2 fields, got 3",
        "row is not valid UTF-8",
        f"file not found: {tmp_path / 'b.wav'}",
    ]
    assert items[1].id == "m.csv:row3" and items[1].origin == f"{manifest}:3"


def test_manifest_path_to_directory_is_an_error_item(tmp_path: Path) -> None:
    (tmp_path / "d.wav").mkdir()
    manifest = tmp_path / "m.txt"
    manifest.write_text("d.wav\n")
    [item] = iter_items([manifest])
    assert item.error == f"is a directory: {tmp_path / 'd.wav'}"


def test_missing_path_column_raises(tmp_path: Path) -> None:
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("name,genre\na.wav,rock\n")
    with pytest.raises(SourceError, match=r"m\.csv.*no path column.*found name, genre"):
        list(iter_items([csv_manifest]))
    with pytest.raises(SourceError, match="no path column"):
        check_inputs([csv_manifest])

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"name": "a.wav"}) + "\n")
    with pytest.raises(SourceError, match=r"m\.jsonl.*no path column"):
        list(iter_items([jsonl]))
    with pytest.raises(SourceError, match="no path column"):
        check_inputs([jsonl])

    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"name": ["a.wav"]}), parquet)
    with pytest.raises(SourceError, match=r"m\.parquet.*no path column"):
        check_inputs([parquet])

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SourceError, match="header"):
        check_inputs([empty])


def test_check_inputs(tmp_path: Path) -> None:
    touch(tmp_path / "d" / "a.wav")
    touch(tmp_path / "one.flac")
    (tmp_path / "ok.csv").write_text("path\na.wav\n")
    check_inputs([tmp_path / "d", tmp_path / "one.flac", tmp_path / "ok.csv"])  # no raise

    with pytest.raises(SourceError, match=r"nope\.wav.*not found"):
        check_inputs([tmp_path / "d", tmp_path / "nope.wav"])
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(SourceError, match="broken symlink"):
        check_inputs([tmp_path / "dangling"])
    with pytest.raises(SourceError, match=r"nope\.wav"):
        list(iter_items([tmp_path / "nope.wav"]))

    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad\.parquet.*cannot read Parquet"):
        check_inputs([corrupt])
    with pytest.raises(SourceError, match="cannot read Parquet"):
        list(iter_items([corrupt]))


def test_declared_columns_from_manifest_headers_schemas_and_first_rows(tmp_path: Path) -> None:
    from flamingo_cli.manifests import declared_columns

    (tmp_path / "a.csv").write_text("path,id,year,genre\nx.wav,1,1999,rock\n")
    rows = [
        {"audio_filepath": "x.wav", "year": 1999, "score": 1, "live": True, "tags": ["a"]},
        {"audio_filepath": "y.wav", "score": 2.5, "note": None},
    ]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(
        pa.table({"path": ["x.wav"], "bpm": pa.array([120], pa.int32()), "rating": [4.5], "offset": [0.0]}),
        tmp_path / "c.parquet",
    )
    (tmp_path / "d.txt").write_text("x.wav\n")
    assert declared_columns([tmp_path / "a.csv"]) == {"year": "string", "genre": "string"}
    assert declared_columns([tmp_path / "b.jsonl"]) == {
        "year": "int64",
        "score": "float64",  # ints with floats
        "live": "bool",
        "tags": "string",  # lists as JSON text
        "note": "string",  # only nulls seen
    }
    assert declared_columns([tmp_path / "c.parquet"]) == {"bpm": "int64", "rating": "float64"}
    # Two manifests that type a key differently: int64 with string -> string.
    assert declared_columns([tmp_path / "b.jsonl", tmp_path / "a.csv"])["year"] == "string"
    # Folders, single files and .txt manifests declare nothing; only the first `rows` objects count.
    assert declared_columns([tmp_path, tmp_path / "d.txt"]) == {}
    assert "score" in declared_columns([tmp_path / "b.jsonl"], rows=1)
    assert "note" not in declared_columns([tmp_path / "b.jsonl"], rows=1)
