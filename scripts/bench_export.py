"""How long ``flamingo export`` (read every committed part, current_rows, write one Parquet) takes.

Builds a synthetic local output (ROWS rows in parts of --rows-per-part, --superseded of them written
twice as a --retry-failed would) and times output.layout.read_output and output.export.export. JSON to stdout.

    python scripts/bench_export.py --rows 1000000 --rows-per-part 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flamingo_cli.output.export import export
from flamingo_cli.output.layout import part_files, read_output, rows_on_disk
from flamingo_cli.records import AudioItem, Chunk, Result
from flamingo_cli.sink import Sink


def build(out: Path, rows: int, per_part: int, superseded: float) -> None:
    def write(ids: range, error: bool, s: Sink) -> None:
        for i in ids:
            item = AudioItem(id=f"item{i:08d}", path=f"/a/{i}.wav", extra={"year": 1990 + i % 30, "genre": "rock"})
            chunk = Chunk(item=item, index=0, num_chunks=1, start_s=0.0, end_s=30.0, samples=None, duration_s=30.0)
            s.write(
                Result(chunk=chunk, prompt="p", error="engine" if error else None, caption=None if error else "x" * 200)
            )

    failed = int(rows * superseded)
    with Sink(out, "abcdef123456", {}, model="m", task="t", rows_per_part=per_part) as s:
        write(range(failed), True, s)
        write(range(failed, rows), False, s)
    with Sink(out, "abcdef123456", {}, model="m", task="t", rows_per_part=per_part, retry_failed=True) as s:
        s.load_index()
        write(range(failed), False, s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rows-per-part", type=int, default=1000)
    ap.add_argument("--superseded", type=float, default=0.1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        build(out, args.rows, args.rows_per_part, args.superseded)
        t1 = time.perf_counter()
        table = read_output(out)
        t2 = time.perf_counter()
        n = export(out, Path(tmp) / "current.parquet")
        t3 = time.perf_counter()
        doc = {
            "rows_on_disk": rows_on_disk(out, "abcdef123456"),
            "current_rows": table.num_rows,
            "exported": n,
            "parts": len(part_files(out, "abcdef123456")),
            "build_s": round(t1 - t0, 2),
            "read_output_s": round(t2 - t1, 2),
            "export_s": round(t3 - t2, 2),
            "export_mrows_per_s": round(n / (t3 - t2) / 1e6, 3),
        }
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
