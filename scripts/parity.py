"""HF parity report: flamingo's vLLM path vs transformers greedy generate, per sequence.

    python scripts/parity.py --kind af3 --ckpt /tmp/af3-full --size full --dtype bfloat16 \
        --n 64 --min-s 30 --max-s 120 --max-new-tokens 32 --device cuda --out parity-af3-bf16.json
    # AF-Next (the AF-Next conversion script's config: cap 1800 s, rope_theta 1800), long audio:
    python scripts/parity.py --kind af-next --ckpt /tmp/af-next-full --size full --dtype bfloat16 \
        --n 16 --min-s 1200 --max-s 1800 --max-new-tokens 32 --batch-size 2 --device cuda
    # both grids through one engine start: --n 64 --min-s 30 --max-s 120 --long-n 16 (1200-1800 s)

Builds the random-weight checkpoint if --ckpt does not exist. The vLLM side runs in a child process so
its GPU memory is released before transformers loads the reference model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flamingo_cli.checkpoints import KINDS
from flamingo_cli.parity import Case


def cases(n: int, min_s: float, max_s: float, seed: int, long_n: int = 0, long_min_s: float = 0, long_max_s: float = 0):
    """``n`` cases in [min_s, max_s] (named c…), then ``long_n`` in [long_min_s, long_max_s] (named l…): both
    grids share one vLLM engine and one reference model, so a lease pays their start once."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompts = ["Describe the audio in detail.", "What instruments do you hear?", "Transcribe the input speech."]
    out = [
        Case(f"c{i:03d}", round(float(rng.uniform(min_s, max_s)), 2), prompts[i % len(prompts)], seed=seed + i)
        for i in range(n)
    ]
    out += [
        Case(
            f"l{i:03d}",
            round(float(rng.uniform(long_min_s, long_max_s)), 2),
            prompts[i % len(prompts)],
            seed=seed + n + i,
        )
        for i in range(long_n)
    ]
    return out


def _cases(args) -> list[Case]:
    return cases(args.n, args.min_s, args.max_s, args.seed, args.long_n, args.long_min_s, args.long_max_s)


def vllm_phase(args) -> None:
    from flamingo_cli.engine import EngineConfig, VllmEngine
    from flamingo_cli.models import family_for
    from flamingo_cli.parity import make_chunks, run_vllm
    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    family = family_for(args.ckpt)
    pairs = make_chunks(_cases(args), family.max_audio_s)
    engine = VllmEngine(
        EngineConfig(
            model=args.ckpt,
            family=family,
            max_chunk_s=family.max_audio_s,
            max_tokens=args.max_new_tokens,
            dtype=args.dtype,
            gpu_memory_utilization=0.85,
            cpu_kv_cache_gb=2,
        )
    )
    t0 = time.perf_counter()
    got = run_vllm(engine, PromptBuilder(family, load_chat_template(args.ckpt)), pairs, args.max_new_tokens)
    seconds = time.perf_counter() - t0
    engine.close()
    payload = {
        f"{k[0]}|{k[1]}": {"prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids, "error": r.error}
        for k, r in got.items()
    }
    Path(args.vllm_json).write_text(json.dumps({"results": payload, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=list(KINDS), required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--min-s", type=float, default=30)
    ap.add_argument("--max-s", type=float, default=120)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-n", type=int, default=0, help="also this many long cases, in the same engine")
    ap.add_argument("--long-min-s", type=float, default=1200)
    ap.add_argument("--long-max-s", type=float, default=1800)
    ap.add_argument("--long-batch-size", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phase", choices=["all", "vllm"], default="all")
    ap.add_argument("--vllm-json", default=None)
    args = ap.parse_args()

    if args.phase == "vllm":
        vllm_phase(args)
        return
    if not Path(args.ckpt, "config.json").exists():
        from flamingo_cli.checkpoints import build_checkpoint

        t0 = time.perf_counter()
        build_dtype = "bfloat16" if args.size == "full" else "float32"
        build_checkpoint(args.kind, args.ckpt, size=args.size, dtype=build_dtype)
        print(f"built {args.kind} {args.size} checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
    args.vllm_json = args.vllm_json or f"/tmp/parity-vllm-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "--phase", "vllm", "--vllm-json", args.vllm_json]
    for k in (
        "kind",
        "ckpt",
        "dtype",
        "n",
        "min_s",
        "max_s",
        "max_new_tokens",
        "seed",
        "long_n",
        "long_min_s",
        "long_max_s",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    subprocess.run(cmd, check=True)
    vllm_out = json.loads(Path(args.vllm_json).read_text())

    from flamingo_cli.models import family_for
    from flamingo_cli.parity import as_dicts, compare, load_reference, make_chunks, run_reference, summarize
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.records import Result

    family = family_for(args.ckpt)
    pairs = make_chunks(_cases(args), family.max_audio_s)
    got = {}
    for case, ch in pairs:
        r = vllm_out["results"].get(f"{ch.key[0]}|{ch.key[1]}")
        if r is not None:
            got[ch.key] = Result(
                chunk=ch,
                prompt=case.prompt,
                error=r["error"],
                prompt_token_ids=r["prompt_token_ids"],
                token_ids=r["token_ids"],
            )
    model, processor = load_reference(args.ckpt, args.dtype, args.device)
    t0 = time.perf_counter()
    builder = PromptBuilder(family, load_chat_template(args.ckpt))
    short = [p for p in pairs if p[0].name.startswith("c")]
    long = [p for p in pairs if not p[0].name.startswith("c")]  # 30-min prompts: smaller batches
    ref = run_reference(model, processor, builder, short, args.max_new_tokens, args.batch_size)
    ref.update(run_reference(model, processor, builder, long, args.max_new_tokens, args.long_batch_size))
    rows = compare(pairs, got, ref)
    summary = summarize(rows)
    if args.long_n:  # one summary per grid, as PARITY.md lists them
        summary["short"] = summarize([r for r in rows if r.case.startswith("c")])
        summary["long"] = summarize([r for r in rows if r.case.startswith("l")])
    summary.update(
        kind=args.kind,
        size=args.size,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        vllm_seconds=round(vllm_out["seconds"], 1),
        hf_seconds=round(time.perf_counter() - t0, 1),
    )
    print(json.dumps(summary))
    for r in rows:
        if r.first_mismatch is not None:
            print(
                f"  {r.case}#{r.chunk_index}: first mismatch at step {r.first_mismatch}, "
                f"margin top1-top2 {r.margin_top2:.4f}, top1-chosen {r.margin_chosen:.4f}"
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": as_dicts(rows)}, indent=1))


if __name__ == "__main__":
    main()
