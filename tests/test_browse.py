"""flamingo browse: the static report, built from outputs written by the real Sink and opened in a real
headless Chromium (Debian's /usr/bin/chromium over the DevTools protocol, tests/chromium.py)."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3_server as s3
import soundfile as sf
from chromium import Chromium, chromium_binary
from conftest import run_cli

from flamingo_cli.browse.report import PAGE_ROWS, BrowseError, build_report
from flamingo_cli.output.layout import read_output
from flamingo_cli.records import AudioItem, Chunk, Result, error_result
from flamingo_cli.sink import Sink
from flamingo_cli.tracks import track_chunk

REPO = Path(__file__).resolve().parent.parent
needs_chromium = pytest.mark.skipif(
    chromium_binary() is None, reason="no chromium binary (apt-get install chromium; scripts/test.sh does as root)"
)
FLAGS = [pa.field("f_mood", pa.string())]  # a typed field (flags are a core column)
s3_server, s3_env, s3_bucket = s3.s3_server, s3.s3_env, s3.s3_bucket  # tests/s3_server.py's fixtures
MOODS = ["calm", "tense", "happy"]
AUDIO = "document.querySelector('#rows-body audio')"


def _result(item: AudioItem, index: int, n: int, chunk_s: float, total: float, **kw) -> Result:
    chunk = Chunk(item, index, n, index * chunk_s, min((index + 1) * chunk_s, total), None, total)
    i = int(item.id.split("-")[1].split(".")[0]) if item.id.startswith("song-") else 0
    flags = ("repetitive",) if i % 3 == 1 else (("truncated", "low_confidence") if i % 3 == 2 else ())
    kw.setdefault("flags", flags)
    return Result(chunk=chunk, prompt="Describe.", finish_reason="stop", prompt_tokens=700 + index, **kw)


def build_output(root: Path, items: int = 6, extra_rows: int = 0) -> Path:
    """Two runs over real WAV files: captions, chunk errors, an unreadable file, flags and a field,
    a retried error (superseded row), an object-store source; ``extra_rows`` more synthetic rows."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    sr = 8000
    out = root / "out"

    def extras(r: Result) -> dict:
        i = int(r.chunk.item.id.split("-")[1].split(".")[0]) if r.chunk.item.id.startswith("song-") else 0
        return {"f_mood": MOODS[i % 3] if r.error is None else None}

    opts = {"extra_fields": FLAGS, "extra_values": extras, "rows_per_part": 4}
    info = {
        "identity": {"prompt": "Describe.", "sampling": {"temperature": 0.0}, "chunk_seconds": 2.0},
        "family": "af3",
    }
    with Sink(out, "aaa111", info, model="nvidia/audio-flamingo-3-hf", task="caption", **opts) as sink:
        for i in range(items):
            path = audio / f"song-{i}.wav"
            sf.write(path, np.zeros(sr * 5, np.float32), sr)
            item = AudioItem(id=path.name, path=str(path), extra={"split": "dev" if i % 2 else "train"})
            for c in range(3):
                if i == 2 and c == 1:
                    sink.write(_result(item, c, 3, 2.0, 5.0, error="rejected by the engine: prompt too long"))
                else:
                    sink.write(_result(item, c, 3, 2.0, 5.0, caption=f"calm piano {i}.{c}", output_tokens=10 + i + c))
            if i == 3:  # a track row (issue 26): the whole item
                chunk = track_chunk(item, 3, 5.0)
                sink.write(Result(chunk, "Tell.", "one calm piano piece", "stop", prompt_tokens=90, output_tokens=12))
        sink.write(
            error_result(AudioItem(id="empty.wav", path=str(audio / "empty.wav")), f"{audio}/empty.wav: empty file")
        )
        remote = AudioItem(id="remote.flac", path="s3://bucket/remote.flac")
        sink.write(_result(remote, 0, 1, 30.0, 30.0, caption="remote tune", output_tokens=9))
        sink.write(
            _result(AudioItem(id="retry.wav", path=str(audio / "song-0.wav")), 0, 1, 5.0, 5.0, error="engine died")
        )
        for k in range(extra_rows):
            item = AudioItem(id=f"zz-{k:06d}.wav", path=str(audio / "song-0.wav"))
            err = "engine died" if k % 97 == 0 else None
            sink.write(
                _result(item, 0, 1, 1.0, 1.0, caption=None if err else f"filler {k}", error=err, output_tokens=5)
            )
    with Sink(
        out, "aaa111", info, model="nvidia/audio-flamingo-3-hf", task="caption", retry_failed=True, **opts
    ) as sink:
        sink.load_index()
        sink.write(_result(AudioItem(id="retry.wav", path=str(audio / "song-0.wav")), 0, 1, 5.0, 5.0, caption="fixed"))
    with Sink(out, "bbb222", {"family": "mf"}, model="nvidia/music-flamingo-2601-hf", task="lyrics") as sink:
        path = audio / "song-1.wav"
        sink.write(
            _result(
                AudioItem(id="song-1.wav", path=str(path)),
                0,
                1,
                5.0,
                5.0,
                caption="la la",
                reasoning="I hear words",
                flags=(),
            )
        )
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("browse")
    out = build_output(root, extra_rows=PAGE_ROWS + 40)  # more rows than one data page
    report = build_report(out)
    return out, report.folder


def test_the_report_holds_every_current_row_once_in_order(small) -> None:
    out, folder = small
    current = read_output(out)
    meta = _meta(folder)
    assert meta["rows"] == current.num_rows
    rows = [r for n in range(meta["pages"]) for r in _page(folder, n)]
    col = {c: i for i, c in enumerate(meta["columns"])}
    assert [(r[col["run"]], r[col["id"]], r[col["chunk_index"]]) for r in rows] == list(
        zip(current["run"].to_pylist(), current["id"].to_pylist(), current["chunk_index"].to_pylist(), strict=True)
    )
    retry = next(r for r in rows if r[col["id"]] == "retry.wav")
    assert retry[col["caption"]] == "fixed" and retry[col["error"]] is None  # the superseded error row is gone
    assert not {"prompt", "model", "path_bytes"} & set(col)  # in the runs table and settings / bookkeeping
    assert {"flags", "f_mood", "split", "reasoning"} <= set(col)
    # the runs as ranges, the error filter as row numbers
    assert [(r["run"], r["rows"]) for r in meta["runs"]] == [("aaa111", current.num_rows - 1), ("bbb222", 1)]
    errors = next(f for f in meta["filters"] if f["kind"] == "errors")
    listed = [n for k in range(errors["chunks"]) for n in _index(folder, errors["id"], k)]
    assert listed == [i for i, e in enumerate(current["error"].to_pylist()) if e is not None]
    labels = {f["label"]: f["count"] for f in meta["filters"]}
    # split = dev: 3 items × 3 chunks + song-3's track row
    assert labels["flag: repetitive"] == 6 and labels["f_mood = calm"] > 0 and labels["split = dev"] == 10
    assert (folder / "sources.txt").read_text().splitlines() == sorted(
        {str(p) for p in (out.parent / "audio").glob("*.wav")} | {str(out.parent / "audio/empty.wav")}
    )


def test_the_summary_uses_inspects_names_and_reads_without_javascript(small) -> None:
    out, folder = small
    html = (folder / "index.html").read_text()
    doc = json.loads(run_cli(["inspect", out, "--json"]).stdout)
    for label in (
        "rows",
        "runs",
        "items",
        "chunks captioned",
        "errors",
        "audio captioned",
        "tokens",
        "errors by reason",
    ):
        assert f">{label}<" in html
    assert f'data-rows="{doc["rows_current"]}"' in html
    assert "1 superseded (retried or re-captioned)" in html and "rejected by the engine: prompt too long" in html
    for title in (
        "audio length per item",
        "generated tokens per chunk",
        "errors by reason",
        "flags by reason",
        "files by extension",
        "throughput over the run",
    ):
        assert f"<figcaption>{title}</figcaption>" in html
    # per-chunk plots: song-3's track row (whole item, 90 prompt tokens, 12 generated) is not a chunk
    prompt_plot = re.search(r"prompt tokens per chunk</figcaption>.*?<p class='dim'>([^<]*)</p>", html, re.S)
    assert prompt_plot and " values from 700 to " in prompt_plot.group(1), prompt_plot
    assert html.count("<svg") >= 6 and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "Describe." in html and "nvidia/music-flamingo-2601-hf" in html  # run settings


def test_the_cli_writes_rebuilds_and_refuses(tmp_path, small) -> None:
    out, _ = small
    to = tmp_path / "r"
    res = run_cli(["browse", out, "--to", to])
    assert res.status == 0, res.stderr
    assert str((to / "index.html").resolve().as_uri()) in res.stdout
    assert run_cli(["browse", out, "--to", to]).status == 0  # an earlier report is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    res = run_cli(["browse", out, "--to", other])
    assert res.status == 2 and "not an earlier flamingo browse report" in res.stderr
    assert (other / "keep.txt").read_text() == "mine"
    res = run_cli(["browse", tmp_path / "nothing"])
    assert res.status == 2 and "no such directory" in res.stderr
    with pytest.raises(BrowseError):
        build_report(tmp_path)
    assert "flamingo browse" in run_cli(["inspect", out]).stdout


@needs_chromium
def test_the_report_in_chromium(small, tmp_path) -> None:
    out, folder = small
    current = read_output(out)
    n_errors = sum(e is not None for e in current["error"].to_pylist())
    with Chromium() as page:
        page.open((folder / "index.html").as_uri())
        page.wait("window.flamingoReady === true")
        assert page.eval("+document.getElementById('row-count').dataset.rows") == current.num_rows
        assert page.eval("document.getElementById('where').textContent") == f"rows 1–50 of {current.num_rows:,}"
        # the player of a chunk plays exactly that chunk
        song = page.eval(
            "[...document.querySelectorAll('#rows-body tr')].filter(tr => tr.textContent.includes('song-3.wav'))"
            ".map(tr => tr.querySelector('audio'))"
            ".map(a => [a.getAttribute('src'), a.dataset.start, a.dataset.end])"
        )
        wav = (out.parent / "audio" / "song-3.wav").as_uri()
        assert song == [
            [f"{wav}#t=0,5", "0", "5"],  # its track row (first: rows sort by chunk_index) plays the whole item
            [f"{wav}#t=0,2", "0", "2"],
            [f"{wav}#t=2,4", "2", "4"],
            [f"{wav}#t=4,5", "4", "5"],
        ]
        where = page.eval(
            "[...document.querySelectorAll('#rows-body tr')].filter(tr => tr.textContent.includes('song-3.wav'))"
            ".map(tr => tr.querySelector('audio').closest('td').previousElementSibling.firstChild.textContent)"
        )
        assert where == ["track", "1/3", "2/3", "3/3"]
        assert page.eval("document.querySelector('#rows-body .remote').textContent").startswith("object-store source")
        # errors only: exactly the error rows
        fid = _meta(folder)["filters"][0]["id"]
        page.eval(f"window.flamingoReady = false; window.flamingoBrowse.view('{fid}')")
        page.wait("window.flamingoReady === true")
        shown = page.eval("[...document.querySelectorAll('#rows-body tr')].map(tr => +tr.dataset.row)")
        assert shown == [i for i, e in enumerate(current["error"].to_pylist()) if e is not None][:50]
        assert page.eval("+document.getElementById('view-count').textContent") == n_errors
        assert page.eval("[...document.querySelectorAll('#rows-body td.error')].every(td => td.textContent.length > 0)")
        # next page, then text search (scans the pages)
        page.eval("window.flamingoReady = false; window.flamingoBrowse.view('')")
        page.wait("window.flamingoReady === true")
        page.eval("window.flamingoReady = false; document.getElementById('next').click()")
        page.wait("window.flamingoReady === true")
        assert page.eval("document.getElementById('where').textContent").startswith("rows 51–100 of")
        page.eval("window.flamingoReady = false; window.flamingoBrowse.search('filler 270')")
        page.wait("window.flamingoReady === true")
        assert page.eval(
            "[...document.querySelectorAll('#rows-body tr')].map(tr => tr.querySelector('.id').textContent)"
        ) == ["zz-000270.wav"]
        # a chunk's player stops at the chunk's end
        page.eval("window.flamingoReady = false; window.flamingoBrowse.search('calm piano 3.1')")
        page.wait("window.flamingoReady === true")
        page.eval("(() => { const a = document.querySelector('#rows-body audio'); a.muted = true; a.play(); })()")
        page.wait(
            f"(() => {{ const a = {AUDIO}; return a.paused && a.played.length > 0; }})()",
            20,
        )
        played = page.eval(
            f"(() => {{ const a = {AUDIO}; return [a.played.start(0), a.played.end(a.played.length - 1)]; }})()"
        )
        assert played[0] == pytest.approx(2.0, abs=0.3) and played[1] == pytest.approx(4.0, abs=0.35)
        page.pump(0.3)
        assert page.errors == []
        assert all(u.startswith(("file://", "data:")) for u in page.requests), page.requests
    # the first screen, for the CI artifact (docs/img/browse.png is the small one)
    with Chromium(width=1280, height=1700) as page:
        page.open((folder / "index.html").as_uri())
        page.wait("window.flamingoReady === true")
        shot = page.screenshot(REPO / "artifacts" / "browse-first-page.png")
        small = page.screenshot(REPO / "artifacts" / "browse-first-page-small.png", scale=0.55)
    assert shot.stat().st_size > 10_000 and small.stat().st_size < shot.stat().st_size


@needs_chromium
def test_serve_sends_the_report_and_ranges_of_listed_audio_only(small) -> None:
    from flamingo_cli.browse.serve import make_server

    out, folder = small
    server = make_server(folder, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        wav = out.parent / "audio" / "song-3.wav"
        req = urllib.request.Request(f"{base}/_audio{wav}", headers={"Range": "bytes=10-19"})
        with urllib.request.urlopen(req) as resp:
            assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 10-19/{wav.stat().st_size}"
            assert resp.read() == wav.read_bytes()[10:20]
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{base}/_audio/etc/passwd")
        assert caught.value.code == 404
        with Chromium() as page:
            page.open(f"{base}/index.html")
            page.wait("window.flamingoReady === true")
            src = page.eval("document.querySelector('#rows-body audio').getAttribute('src')")
            assert src.startswith("/_audio/") and "#t=" in src
            page.pump(0.2)
            assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()


def _meta(folder: Path) -> dict:
    return _call(folder / "data" / "meta.js", "flamingoMeta")[0]


def _page(folder: Path, n: int) -> list:
    number, rows = _call(folder / "data" / "p" / f"{n}.js", "flamingoPage")
    assert number == n
    return rows


def _index(folder: Path, fid: str, k: int) -> list:
    return _call(folder / "data" / "f" / fid / f"{k}.js", "flamingoIndex")[2]


def _call(path: Path, name: str) -> list:
    text = path.read_text(encoding="utf-8").strip()
    assert text.startswith(name + "(") and text.endswith(");")
    return json.loads("[" + text[len(name) + 1 : -2] + "]")


def test_an_output_on_an_object_store(s3_bucket, tmp_path, monkeypatch) -> None:
    """An s3:// output: read through the layout's commit log; the report goes to ./browse-<name>."""
    url = f"s3://{s3_bucket}/caps"
    with Sink(url, "ccc333", {}, model="m", task="caption", rows_per_part=2) as sink:
        for i in range(5):
            item = AudioItem(id=f"t{i}.flac", path=f"s3://{s3_bucket}/audio/t{i}.flac")
            sink.write(_result(item, 0, 1, 10.0, 10.0, caption=f"tune {i}", error="bad" if i == 3 else None))
    monkeypatch.chdir(tmp_path)
    report = build_report(url)
    assert report.folder == tmp_path / "browse-caps" and report.rows == 5
    meta = _meta(report.folder)
    assert meta["out"] == url and [f["count"] for f in meta["filters"] if f["kind"] == "errors"] == [1]
    assert (report.folder / "sources.txt").read_text() == ""  # nothing local to serve
