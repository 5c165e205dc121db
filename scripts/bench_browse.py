"""How fast ``flamingo browse`` builds and opens the report of a large output (no audio, no model).

Builds a synthetic local output of ROWS current rows with the project's own writer (``sink.Sink``:
1 to 3 chunks per item, 1 % chunk errors, ``flags`` on 5 %, a typed field), then
``browse.build_report``, then opens the report in headless Chromium (tests/chromium.py, Debian's
/usr/bin/chromium) and times: the first page, the next page, a page in the middle, the "errors only"
filter and its next page, and a text search that has to scan. One JSON line to stdout.

    python scripts/bench_browse.py --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chromium import Chromium

from flamingo_cli.browse.report import build_report
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sink import Sink

MOODS = ["calm", "tense", "happy", "sad"]


def build(out: Path, rows: int, per_part: int) -> None:
    def extras(r: Result) -> dict:
        i = r.chunk.item.extra["n"]
        return {"f_mood": MOODS[i % 4]}

    fields = [pa.field("f_mood", pa.string())]
    with Sink(
        out, "abcdef123456", {}, model="m", task="t", rows_per_part=per_part, extra_fields=fields, extra_values=extras
    ) as s:
        written, i = 0, 0
        while written < rows:
            n = min(1 + i % 3, rows - written)
            item = AudioItem(id=f"item{i:08d}", path=f"/data/audio/{i % 1000}/{i}.flac", extra={"n": i})
            for c in range(n):
                chunk = Chunk(item, c, n, c * 30.0, (c + 1) * 30.0, None, n * 30.0)
                err = "rejected by the engine: prompt too long" if (written + c) % 100 == 7 else None
                caption = None if err else f"A calm piano piece with soft strings, item {i} part {c}; " + "la " * 30
                s.write(
                    Result(
                        chunk=chunk,
                        prompt="p",
                        caption=caption,
                        error=err,
                        prompt_tokens=800,
                        output_tokens=60 + i % 50,
                        flags=("repetition",) if i % 20 == 0 else (),
                    )
                )
            written += n
            i += 1


def timed(page: Chromium, action: str) -> float:
    page.eval("window.flamingoReady = false")
    t0 = time.perf_counter()
    page.eval(action)
    page.wait("window.flamingoReady === true", 120)
    return round(time.perf_counter() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-per-part", type=int, default=10_000)
    ap.add_argument("--keep", help="Build the output and the report here (kept) instead of a temp folder.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        out = root / "out"
        t0 = time.perf_counter()
        if not out.exists():
            build(out, args.rows, args.rows_per_part)
        t1 = time.perf_counter()
        report = build_report(out, to=root / "report")
        t2 = time.perf_counter()
        files = sum(1 for p in report.folder.rglob("*") if p.is_file())
        index_kb = (report.folder / "index.html").stat().st_size / 1e3 + (
            report.folder / "data" / "meta.js"
        ).stat().st_size / 1e3
        with Chromium() as page:
            t3 = time.perf_counter()
            page.open(report.url)
            page.wait("window.flamingoReady === true", 120)
            first = round(time.perf_counter() - t3, 3)
            shown = page.eval("+document.getElementById('row-count').dataset.rows")
            nxt = timed(page, "document.getElementById('next').click()")
            middle = timed(page, f"window.flamingoBrowse.go({report.rows // 2})")
            errors = timed(page, "window.flamingoBrowse.view('f0')")
            err_next = timed(page, "document.getElementById('next').click()")
            err_count = page.eval("+document.getElementById('view-count').textContent")
            search = timed(page, "window.flamingoBrowse.view(''); window.flamingoBrowse.search('item 4242 part')")
            scanned = page.eval("document.getElementById('status').textContent")
            assert not page.errors, page.errors
        doc = {
            "bench": "browse",
            "rows": report.rows,
            "rows_shown": shown,
            "error_rows": err_count,
            "build_output_s": round(t1 - t0, 1),
            "build_report_s": round(t2 - t1, 1),
            "report_mb": round(report.bytes / 1e6, 1),
            "index_kb": round(index_kb, 1),
            "files": files,
            "pages": report.pages,
            "open_first_page_s": first,
            "next_page_s": nxt,
            "middle_page_s": middle,
            "errors_filter_s": errors,
            "errors_next_page_s": err_next,
            "search_s": search,
            "search_status": scanned,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        }
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
