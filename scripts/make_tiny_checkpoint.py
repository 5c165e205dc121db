"""Build a random-weight AF3 / Music Flamingo / AF-Next checkpoint (tiny for CI, full for GPU).

python scripts/make_tiny_checkpoint.py --kind af3 --out /tmp/tiny-af3
python scripts/make_tiny_checkpoint.py --kind mf --size full --dtype bfloat16 --out /tmp/mf-full
python scripts/make_tiny_checkpoint.py --kind af-next-think --out /tmp/tiny-af-next-think
python scripts/make_tiny_checkpoint.py --kind af-next --size full --dtype bfloat16 --out /tmp/af-next-full
"""

import argparse
import time

from flamingo_cli.checkpoints import KINDS, build_checkpoint

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=list(KINDS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = build_checkpoint(args.kind, args.out, size=args.size, dtype=args.dtype, seed=args.seed)
    print(f"wrote {args.kind} ({args.size}, {args.dtype}) to {path} in {time.perf_counter() - t0:.1f} s")
