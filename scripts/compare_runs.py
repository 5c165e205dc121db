"""How far two CLI runs' captions agree, row by row (the same clips, greedy): the share of identical
captions and the mean share of each caption's words that match the other's from the start. Two runs of
one engine already differ a little (bf16 near-ties flip with another batch), so compare a change's
pair against such a pair. Prints one JSON line; appends it to RESULTS when given.

    usage: compare_runs.py OUT_A OUT_B [RESULTS]      (OUT_*: flamingo caption --out folders)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def captions(out: str) -> dict[tuple[str, int], str]:
    import pyarrow.parquet as pq

    rows: dict[tuple[str, int], str] = {}
    for path in sorted(Path(out).rglob("*.parquet")):
        table = pq.read_table(path)
        names = set(table.column_names)
        if not {"id", "caption"} <= names:
            continue
        chunk = table.column("chunk_index").to_pylist() if "chunk_index" in names else [0] * table.num_rows
        ids, texts = table.column("id").to_pylist(), table.column("caption").to_pylist()
        for rid, index, caption in zip(ids, chunk, texts, strict=True):
            if caption is not None:
                rows[(rid, int(index or 0))] = caption
    return rows


def prefix_share(a: str, b: str) -> float:
    wa, wb = a.split(), b.split()
    n = 0
    for x, y in zip(wa, wb, strict=False):
        if x != y:
            break
        n += 1
    return n / max(1, max(len(wa), len(wb)))


def main(argv: list[str]) -> int:
    a, b = captions(argv[0]), captions(argv[1])
    keys = sorted(set(a) & set(b))
    same = sum(a[k] == b[k] for k in keys)
    row = {
        "mode": "compare",
        "a": Path(argv[0]).name,
        "b": Path(argv[1]).name,
        "rows": len(keys),
        "only_a": len(set(a) - set(b)),
        "only_b": len(set(b) - set(a)),
        "identical": round(same / max(1, len(keys)), 4),
        "prefix_share": round(sum(prefix_share(a[k], b[k]) for k in keys) / max(1, len(keys)), 4),
    }
    print("RESULT", json.dumps(row))
    if len(argv) > 2:
        with open(argv[2], "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
