"""Inputs where data lives: S3 (a real S3-compatible server on localhost), HF datasets, WebDataset shards
and lhotse manifests, each built by the tests with the real libraries; end to end through `flamingo
caption` with the fake engine, and once through the real engine on the tiny AF3 checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import ENGINE_ARGS, make_audio, read_rows, run_cli
from s3_server import s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)
from test_reliability import FAKE_ARGS, FakeEngine

from flamingo_cli import audio, remote
from flamingo_cli.manifests import SourceError
from flamingo_cli.records import AudioItem
from flamingo_cli.resume import fingerprint, source_changed
from flamingo_cli.sources import check_inputs, iter_items


def wav_bytes(seconds: float, seed: int = 0, fmt: str = "WAV", sr: int = 16000) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def s3fs_client():
    import s3fs

    return s3fs.S3FileSystem()


# --- remote helpers --------------------------------------------------------------------------------------


def test_urls_are_recognised_joined_and_redacted() -> None:
    assert remote.is_url("s3://b/k.wav") and remote.is_url("tar://a.flac::s3://b/x.tar")
    assert not remote.is_url("C:\\audio\\a.wav") and not remote.is_url("rel/a.wav")
    assert remote.join("s3://b/data/", "../audio/a.wav") == "s3://b/audio/a.wav"
    assert remote.join("s3://b/data/", "/top/a.wav") == "s3://b/top/a.wav"
    assert remote.join("s3://b/data/", "gs://o/a.wav") == "gs://o/a.wav"
    secret = "https://user:pw@host/x.wav?X-Amz-Signature=abc&X-Amz-Credential=key"
    assert "pw" not in remote.redact(secret) and "abc" not in remote.redact(secret)
    assert remote.redact(secret).startswith("https://host/x.wav")


# --- S3 ---------------------------------------------------------------------------------------------------


def test_s3_folder_listing_manifest_and_missing_input(s3_bucket: str) -> None:  # noqa: F811
    fs = s3fs_client()
    for key in ("audio/b.wav", "audio/a/x.wav", "audio/a-b.wav", "audio/.hidden.wav", "audio/notes.txt"):
        fs.pipe(f"{s3_bucket}/{key}", wav_bytes(0.2))
    local_order = ["a-b.wav", "a/x.wav", "b.wav"]  # what a local scan of the same tree yields
    items = list(iter_items([f"s3://{s3_bucket}/audio"]))
    assert [i.id for i in items] == local_order
    assert [i.path for i in items] == [f"s3://{s3_bucket}/audio/{rel}" for rel in local_order]

    rows = [{"path": "../audio/b.wav", "id": "seg", "offset": 0.05, "duration": 0.1, "lang": "en"}]
    rows.append({"path": f"s3://{s3_bucket}/audio/a/x.wav"})
    fs.pipe(f"{s3_bucket}/lists/m.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    check_inputs([f"s3://{s3_bucket}/lists/m.jsonl", f"s3://{s3_bucket}/audio"])
    seg, whole = iter_items([f"s3://{s3_bucket}/lists/m.jsonl"])
    assert (seg.id, seg.path, seg.offset, seg.duration, dict(seg.extra)) == (
        "seg", f"s3://{s3_bucket}/audio/b.wav", 0.05, 0.1, {"lang": "en"}
    )  # fmt: skip
    assert whole.path == f"s3://{s3_bucket}/audio/a/x.wav" and whole.error is None
    assert audio.decode(seg).samples.shape == (1600,)

    with pytest.raises(SourceError, match="input not found"):
        check_inputs([f"s3://{s3_bucket}/nothing-here"])
    missing = AudioItem(id="m", path=f"s3://{s3_bucket}/audio/gone.wav")
    with pytest.raises(audio.AudioDecodeError, match="file not found"):
        audio.decode(missing)
    assert fingerprint(missing) is None


def test_s3_segment_is_a_ranged_read_and_matches_local_decode(
    s3_bucket: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = wav_bytes(300.0, seed=3)  # 9.6 MB
    (tmp_path / "long.wav").write_bytes(data)
    s3fs_client().pipe(f"{s3_bucket}/long.wav", data)
    import s3fs.core

    fetched_ranges: list[int] = []
    real_fetch = s3fs.core.S3File._fetch_range

    def counting_fetch(self, start, end):
        data = real_fetch(self, start, end)
        fetched_ranges.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting_fetch)
    item = AudioItem(id="x", path=f"s3://{s3_bucket}/long.wav", offset=250.0, duration=2.0)
    got = audio.decode(item)
    want = audio.decode(AudioItem(id="x", path=str(tmp_path / "long.wav"), offset=250.0, duration=2.0))
    np.testing.assert_array_equal(got.samples, want.samples)
    fetched = sum(fetched_ranges)
    assert 0 < fetched < len(data) / 2, f"fetched {fetched} of {len(data)} bytes"


def test_s3_fingerprint_sees_a_new_upload(s3_bucket: str) -> None:  # noqa: F811
    fs = s3fs_client()
    url = f"s3://{s3_bucket}/a.wav"
    fs.pipe(url, wav_bytes(0.2, seed=1))
    first = fingerprint(url)
    assert first is not None and first.size == len(wav_bytes(0.2, seed=1)) and first.mtime_ns > 0
    assert fingerprint(url, content_hash=True).sha256 is not None
    fs.pipe(url, wav_bytes(0.3, seed=2))
    fs.invalidate_cache()
    assert source_changed(first, fingerprint(url))


def test_http_manifest_and_audio(tmp_path: Path) -> None:
    """http(s) is read-only: a manifest and its relative audio paths, served by a local HTTP server."""
    import functools
    import http.server
    import threading

    make_audio(tmp_path / "site" / "audio" / "a.wav", 0.5)
    (tmp_path / "site" / "lists").mkdir()
    (tmp_path / "site" / "lists" / "m.csv").write_text("path,offset,duration\n../audio/a.wav,0.1,0.2\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        check_inputs([f"{base}/lists/m.csv"])
        (item,) = iter_items([f"{base}/lists/m.csv"])
        assert (item.id, item.path) == ("../audio/a.wav@0.1", f"{base}/audio/a.wav")
        assert audio.decode(item).samples.shape == (3200,)
        assert fingerprint(item).size == (tmp_path / "site" / "audio" / "a.wav").stat().st_size
        with pytest.raises(SourceError, match="input not found"):
            check_inputs([f"{base}/lists/none.csv"])
    finally:
        server.shutdown()


# --- WebDataset -------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[dict]) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def shard_samples(seed: int = 0) -> list[dict]:
    return [
        {"__key__": f"s{seed}_000", "flac": wav_bytes(0.3, seed, "FLAC"), "json": {"speaker": "ann", "year": 2020}},
        {"__key__": f"s{seed}_001", "wav": wav_bytes(0.2, seed + 1), "txt": "a dog barks", "cls": 3},
        {"__key__": f"s{seed}_002", "json": {"speaker": "no audio here"}},
    ]


def test_webdataset_shards_local_gz_and_remote(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    plain = write_shard(tmp_path / "shard-000.tar", shard_samples(0))
    gz = write_shard(tmp_path / "shard-001.tar.gz", shard_samples(1))
    check_inputs([plain, gz])
    items = list(iter_items([plain, gz]))
    assert [i.id for i in items] == ["s0_000.flac", "s0_001.wav", "s1_000.flac", "s1_001.wav"]
    first, second = items[:2]
    assert dict(first.extra) == {"speaker": "ann", "year": 2020}
    assert dict(second.extra) == {"txt": "a dog barks", "cls": 3}
    assert first.path == f"tar://s0_000.flac::{plain}"
    assert audio.decode(first).duration_s == pytest.approx(0.3)
    # The path is a real fsspec URL to the member.
    with remote.open_binary(first.path) as f:
        assert f.read() == first.data

    counted = list(iter_items([plain, gz], with_data=False))  # the progress counter's walk: no audio bytes
    assert [i.id for i in counted] == [i.id for i in items] and all(i.data is None for i in counted)

    s3fs_client().put(str(plain), f"{s3_bucket}/shards/shard-000.tar")
    remote_items = list(iter_items([f"s3://{s3_bucket}/shards/shard-000.tar"]))
    assert [(i.id, i.data) for i in remote_items] == [(i.id, i.data) for i in items[:2]]

    broken = tmp_path / "broken.tar"
    broken.write_bytes(plain.read_bytes()[:1500])
    bad = list(iter_items([broken]))
    assert bad[-1].error is not None and "cannot read tar shard" in bad[-1].error
    with pytest.raises(SourceError, match="not a tar shard"):
        (tmp_path / "text.tar").write_text("hello")
        check_inputs([tmp_path / "text.tar"])


# --- HF datasets -----------------------------------------------------------------------------------------


def hf_dataset(n: int, with_id: bool = True, split_seed: int = 0):
    import datasets

    rows = {
        "audio": [{"bytes": wav_bytes(0.2 + 0.1 * i, split_seed + i), "path": None} for i in range(n)],
        "speaker": [f"spk{i}" for i in range(n)],
    }
    if with_id:
        rows["id"] = [f"utt{split_seed + i}" for i in range(n)]
    return datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())


def test_hf_datasets_save_to_disk_parquet_and_paths(tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": hf_dataset(2), "test": hf_dataset(1, split_seed=10)}).save_to_disk(str(saved))
    check_inputs([saved])
    items = list(iter_items([saved]))
    assert [i.id for i in items] == ["utt0", "utt1", "utt10"]
    assert [dict(i.extra) for i in items] == [{"speaker": "spk0"}, {"speaker": "spk1"}, {"speaker": "spk0"}]
    assert audio.decode(items[1]).duration_s == pytest.approx(0.3)
    assert [i.id for i in iter_items([f"hf:{saved}#test"])] == ["utt10"]
    assert [(i.id, i.data) for i in iter_items([saved], with_data=False)] == [(i.id, None) for i in items]

    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    hf_dataset(3, with_id=False).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    pq_items = list(iter_items([f"hf:{tmp_path / 'pq'}"]))
    assert [i.id for i in pq_items] == ["train/0", "train/1", "train/2"]
    assert all(i.data for i in pq_items)
    # The same Parquet file given directly: its audio column of bytes/path structs makes it a dataset.
    assert [i.id for i in iter_items([folder / "train-00000-of-00001.parquet"])] == ["train/0", "train/1", "train/2"]

    # Rows that name files (relative to the Parquet file) instead of embedding them.
    make_audio(tmp_path / "files" / "a.wav", 0.4)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"audio": pa.array([{"bytes": None, "path": "files/a.wav"}], audio_type)})
    pq.write_table(table, tmp_path / "bypath.parquet")
    (item,) = iter_items([tmp_path / "bypath.parquet"])
    assert item.data is None and item.path == str(tmp_path / "files" / "a.wav")
    assert audio.decode(item).duration_s == pytest.approx(0.4)

    with pytest.raises(SourceError, match="no Audio column"):
        datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "noaudio"))
        check_inputs([tmp_path / "noaudio"])


def test_dataset_rows_read_ids_offsets_and_durations_as_manifest_rows_do(tmp_path: Path) -> None:
    """A boolean duration is refused and a blank one is absent, in a dataset row as in a manifest row;
    a repeated id is an error row naming where it came first."""
    flags = hf_dataset(2).add_column("duration", [True, None])
    blanks = hf_dataset(2).add_column("duration", ["", " 0.1"]).add_column("offset", [" ", ""])
    flags.save_to_disk(str(tmp_path / "flags"))
    blanks.save_to_disk(str(tmp_path / "blanks"))
    t, none = iter_items([tmp_path / "flags"])
    assert (t.id, t.error, t.duration, t.data) == ("utt0", "duration is not a number: True", None, None)
    assert (none.error, none.offset, none.duration) == (None, 0.0, None)
    blank, short = iter_items([tmp_path / "blanks"])
    assert (blank.error, blank.offset, blank.duration) == (None, 0.0, None)
    assert (short.error, short.duration) == (None, 0.1)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"path": "x.wav", "duration": d}) + "\n" for d in (True, "", None)))
    assert [i.error for i in iter_items([manifest])][:1] == ["duration is not a number: True"]
    assert [(i.id, i.duration) for i in iter_items([manifest])][1:] == [("x.wav", None), ("x.wav", None)]

    hf_dataset(2).map(lambda r: {"id": "same"}).save_to_disk(str(tmp_path / "dupes"))
    first, second = iter_items([tmp_path / "dupes"])
    assert (first.error, second.error) == (None, "duplicate id 'same' (first at train/0)")
    assert (second.data, dict(second.extra)) == (None, {"speaker": "spk1"})


def test_lhotse_segments_and_ids_follow_the_manifest_rules(tmp_path: Path) -> None:
    wav = make_audio(tmp_path / "a.wav", 1.0)
    rec = {"id": "rec", "sources": [{"type": "file", "channels": [0], "source": str(wav)}], "sampling_rate": 16000}
    cuts = [
        {"id": "c", "start": 0.5, "duration": 0.25, "channel": 0, "recording": rec, "type": "MonoCut"},
        {"id": "c", "start": 0, "duration": 0.25, "channel": 0, "recording": rec, "type": "MonoCut"},
        {"id": "bool", "start": 0, "duration": True, "channel": 0, "recording": rec, "type": "MonoCut"},
        {"id": "neg", "start": -1, "duration": 0.25, "channel": 0, "recording": rec, "type": "MonoCut"},
    ]
    (tmp_path / "cuts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cuts))
    c, dup, flag, neg = iter_items([tmp_path / "cuts.jsonl"])
    assert (c.id, c.offset, c.duration, c.error) == ("c", 0.5, 0.25, None)
    assert (dup.id, dup.error) == ("c", "duplicate id 'c' (first at row 1)")
    assert flag.error == "duration is not a number: True"
    assert neg.error == "offset must be a finite number >= 0: -1"


def test_hf_dataset_folder_on_s3(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    """A save_to_disk folder uploaded to S3 is detected there and read through fsspec."""
    hf_dataset(2).save_to_disk(str(tmp_path / "ds"))
    s3fs_client().put(str(tmp_path / "ds"), f"{s3_bucket}/ds", recursive=True)
    items = list(iter_items([f"s3://{s3_bucket}/ds"]))
    assert [(i.id, i.data) for i in items] == [(i.id, i.data) for i in iter_items([tmp_path / "ds"])]


def test_embedded_items_fingerprint_by_content() -> None:
    a = AudioItem(id="x", path="ds#train/0", data=wav_bytes(0.2, 1))
    b = AudioItem(id="x", path="ds#train/0", data=wav_bytes(0.2, 2))  # same size, other bytes
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa.size == fb.size and source_changed(fa, fb) and not source_changed(fa, fingerprint(a))


def test_ray_task_decodes_embedded_audio() -> None:
    """--executor ray: the row sent to a Ray task carries the item's bytes (the task body, without Ray)."""
    from flamingo_cli.ray_data import prepare_item

    row = {"seq": 0, "id": "utt0", "path": "ds#train/0", "data": wav_bytes(2.0), "offset": 0.5, "duration": None}
    kwargs = dict(family="af3", chat_template=None, max_chunk_s=600.0, chunk_s=None, overlap_s=0.0, seed=None)
    (chunk,) = prepare_item({**row, "prompt": "Say.", "skip": []}, **kwargs)
    assert chunk["error"] is None and len(chunk["audio"]) == 24000


# --- lhotse ----------------------------------------------------------------------------------------------


def test_lhotse_cuts_and_recordings(tmp_path: Path) -> None:
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment

    wav = make_audio(tmp_path / "audio" / "long.wav", 3.0)
    rec = Recording.from_file(str(wav))
    cuts = []
    for i, start in enumerate((0.5, 1.5)):
        cut = rec.to_cut().truncate(offset=start, duration=0.75)
        cut.id = f"cut{i}"
        cut.supervisions = [SupervisionSegment(id=f"sup{i}", recording_id=rec.id, start=0, duration=0.75, text="hi")]
        cuts.append(cut)
    CutSet.from_cuts(cuts).to_file(str(tmp_path / "cuts.jsonl.gz"))
    RecordingSet.from_recordings([rec]).to_file(str(tmp_path / "recordings.jsonl"))

    check_inputs([tmp_path / "cuts.jsonl.gz", tmp_path / "recordings.jsonl"])
    c0, c1, whole = iter_items([tmp_path / "cuts.jsonl.gz", tmp_path / "recordings.jsonl"])
    assert (c0.id, c0.path, c0.offset, c0.duration) == ("cut0", str(wav), 0.5, 0.75)
    assert (c1.offset, dict(c1.extra)) == (1.5, {"recording_id": rec.id, "text": "hi"})
    assert (whole.id, whole.offset, whole.duration) == (rec.id, 0.0, None)
    np.testing.assert_allclose(
        audio.decode(c1).samples, audio.decode(AudioItem(id="w", path=str(wav))).samples[24000:36000], atol=1e-6
    )
    # A flamingo JSONL manifest is still a manifest.
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "audio/long.wav"}) + "\n")
    assert [i.id for i in iter_items([tmp_path / "m.jsonl"])] == ["audio/long.wav"]


# --- end to end ------------------------------------------------------------------------------------------


def test_caption_every_input_kind_end_to_end(fake: FakeEngine, s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    """s3:// folder + s3:// manifest + HF dataset + WebDataset shard + lhotse cuts in one run; a second run
    adds nothing; a re-uploaded object and a changed dataset row are captioned again."""
    from lhotse import CutSet, Recording

    fs = s3fs_client()
    fs.pipe(f"{s3_bucket}/audio/a.wav", wav_bytes(0.3, 1))
    fs.pipe(f"{s3_bucket}/audio/sub/b.flac", wav_bytes(0.4, 2, "FLAC"))
    fs.pipe(f"{s3_bucket}/lists/m.csv", b"path,id,genre\n../audio/a.wav,m-a,jazz\n")
    hf_dir = tmp_path / "hf"
    hf_dataset(2).save_to_disk(str(hf_dir))
    shard = write_shard(tmp_path / "shard.tar", shard_samples(5))
    wav = make_audio(tmp_path / "rec.wav", 2.0)
    cut = Recording.from_file(str(wav)).to_cut().truncate(offset=1.0, duration=0.5)
    cut.id = "cut-1"
    CutSet.from_cuts([cut]).to_file(str(tmp_path / "cuts.jsonl.gz"))

    inputs = [f"s3://{s3_bucket}/audio", f"s3://{s3_bucket}/lists/m.csv", hf_dir, shard, tmp_path / "cuts.jsonl.gz"]
    out = tmp_path / "out"
    plan = run_cli(["caption", *inputs, "--out", out, "--dry-run", "--json", *FAKE_ARGS])
    assert plan.status == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert (doc["files"], doc["readable"], doc["source_errors"]) == (8, 8, 0)
    res = run_cli(["caption", *inputs, "--out", out, *FAKE_ARGS])
    assert res.status == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    want = {"a.wav", "sub/b.flac", "m-a", "utt0", "utt1", "s5_000.flac", "s5_001.wav", "cut-1"}
    assert set(rows) == want
    # m-a (a.wav through a manifest) and utt1 (wav_bytes(0.3, 1) too) are a.wav's audio: captioned once (gates.py)
    assert all(r["error"] is None and r["caption"] == f"fake:{r['duplicate_of'] or i}#0" for i, r in rows.items())
    assert {i: r["duplicate_of"] for i, r in rows.items() if r["gate"]} == {"m-a": "a.wav", "utt1": "a.wav"}
    assert rows["m-a"]["path"] == f"s3://{s3_bucket}/audio/a.wav"
    assert rows["cut-1"]["duration_s"] == pytest.approx(0.5)

    fake.requests.clear()
    assert run_cli(["caption", *inputs, "--out", out, *FAKE_ARGS]).status == 0
    assert fake.requests == []

    fs.pipe(f"{s3_bucket}/audio/sub/b.flac", wav_bytes(0.5, 3, "FLAC"))
    hf_dataset(2, split_seed=7).map(lambda r, i: {"id": f"utt{i}"}, with_indices=True).save_to_disk(
        str(tmp_path / "hf2")
    )
    inputs[2] = tmp_path / "hf2"
    assert run_cli(["caption", *inputs, "--out", out, *FAKE_ARGS]).status == 0
    assert sorted(fake.requests) == [("sub/b.flac", 0), ("utt0", 0), ("utt1", 0)]


@pytest.mark.engine
def test_hf_dataset_on_the_tiny_af3_engine(tiny_af3: Path, tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dataset(2).save_to_disk(str(hf_dir))
    out = tmp_path / "out"
    res = run_cli(["caption", hf_dir, "--out", out, "--model", tiny_af3, *ENGINE_ARGS])
    assert res.status == 0, res.stderr
    rows = sorted(read_rows(out), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["utt0", "utt1"]
    assert all(r["error"] is None and r["caption"] and r["output_tokens"] > 0 for r in rows)
    assert [r["speaker"] for r in rows] == ["spk0", "spk1"]
