"""GPU throughput benchmark: flamingo end to end vs raw vLLM vs transformers; data-parallel scaling.

    python scripts/bench.py data --dir /tmp/bench-audio --windows 2000
    python scripts/bench.py ckpt --kind af3 --out /tmp/af3-full
    python scripts/bench.py ceiling  --ckpt /tmp/af3-full --dir /tmp/bench-audio [--max-num-seqs N ...]
    python scripts/bench.py flamingo --ckpt /tmp/af3-full --dir /tmp/bench-audio [--max-num-seqs N ...]
    python scripts/bench.py hf --ckpt /tmp/af3-full --dir /tmp/bench-audio --batch 8 --windows 256
    python scripts/bench.py flamingo --ckpt /tmp/af3-full --dir /tmp/bench-audio --gpus 0,1 --workers 24

Every mode prints one JSON line (and appends it to --results). Workload: 30 s windows, 128 output
tokens with ignore_eos, distinct audio per request (vLLM caches multimodal inputs). Throughput is
measured after the engine has started (engine start is reported separately).
MFU counts ~14.4 TFLOP per window (encoder 2.3 + prefill 10.3 + 128 decode steps 1.8) against the
798 TFLOP/s dense bf16 measured on an H100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TFLOP_PER_WINDOW = 14.4
PEAK_TFLOPS = 798.0
OUT_TOKENS = 128


class GpuBusy:
    """Mean GPU utilisation (nvidia-smi, every 200 ms) while the block runs."""

    def __enter__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        try:
            proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError:
            return
        for line in proc.stdout:
            if self._stop.is_set():
                break
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.strip().split("\n")[0]))
        proc.terminate()

    def __exit__(self, *exc):
        self._stop.set()
        self.busy = sum(self.samples) / len(self.samples) if self.samples else None


def _write_one(args):
    import numpy as np
    import soundfile as sf

    path, seconds, sr, channels, seed = args
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(80, 800) * t) + 0.05 * rng.standard_normal(n)
    data = np.stack([x, np.roll(x, 7)], axis=1) if channels == 2 else x
    sf.write(path, data.astype(np.float32), sr)
    return path


def cmd_data(a):
    """Compressed files on disk: MP3 and FLAC, mixed rates and channels, a few multi-minute tracks."""
    import math

    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    jobs, windows, i = [], 0, 0
    kinds = [(".mp3", 44100, 2), (".flac", 48000, 1), (".mp3", 22050, 1), (".flac", 16000, 2), (".flac", 44100, 2)]
    while windows < a.windows:
        long = i % 60 == 0
        seconds = 300.0 if long else 20.0 + (i * 7919 % 1000) / 100  # 20-30 s: one window each
        ext, sr, ch = kinds[i % len(kinds)]
        jobs.append((str(root / f"{i:05d}{ext}"), seconds, sr, ch, i))
        windows += math.ceil(seconds / 30)
        i += 1
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_one, jobs, chunksize=8))
    hours = sum(j[1] for j in jobs) / 3600
    return {
        "mode": "data",
        "files": len(jobs),
        "windows": windows,
        "audio_hours": round(hours, 2),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def cmd_ckpt(a):
    from flamingo_cli.checkpoints import build_checkpoint

    t0 = time.perf_counter()
    build_checkpoint(a.kind, a.out, size="full", dtype="bfloat16")
    return {"mode": "ckpt", "kind": a.kind, "seconds": round(time.perf_counter() - t0, 1)}


def _engine_config(a, family):
    from flamingo_cli.engine import EngineConfig

    extra = {}
    if a.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = a.max_num_batched_tokens
    return EngineConfig(
        model=a.ckpt,
        family=family,
        max_chunk_s=float(family.max_audio_s),
        max_tokens=OUT_TOKENS,
        dtype="bfloat16",
        gpu_memory_utilization=a.gpu_memory_utilization,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enforce_eager=a.enforce_eager,
        max_in_flight=a.max_in_flight,
        devices=_devices(a),
        replica_threads=a.replica_threads,
    )


def _devices(a):
    """--gpus/--replicas as flamingo caption reads them; () keeps the engine in this process."""
    if a.gpus is None and a.replicas is None:
        return ()
    from flamingo_cli.data_parallel import plan_replicas

    return tuple(plan_replicas(a.gpus, 1, a.replicas))


def _report(mode, a, windows, audio_s, seconds, prompt_tokens, output_tokens, busy, start_s, **extra):
    wps = windows / seconds
    return {
        "mode": mode,
        "windows": windows,
        "seconds": round(seconds, 2),
        "windows_per_s": round(wps, 2),
        "x_realtime": round(audio_s / seconds, 1),
        "prompt_tok_s": round(prompt_tokens / seconds),
        "output_tok_s": round(output_tokens / seconds),
        "gpu_busy_pct": round(busy, 1) if busy else None,
        "mfu": round(wps * TFLOP_PER_WINDOW / PEAK_TFLOPS, 3),
        "engine_start_s": round(start_s, 1),
        "max_num_seqs": a.max_num_seqs,
        "max_num_batched_tokens": a.max_num_batched_tokens,
        **extra,
    }


def cmd_flamingo(a):
    """flamingo's own pipeline from files on disk: decode pool -> chunks -> engine -> Parquet."""
    import shutil

    from flamingo_cli.engine import Sampling
    from flamingo_cli.launch import get_engine
    from flamingo_cli.models import family_for
    from flamingo_cli.pipeline import CaptionJob, Stats, run_pipeline
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.sink import Sink

    family = family_for(a.ckpt)
    t0 = time.perf_counter()
    engine = get_engine(_engine_config(a, family))
    start_s = time.perf_counter() - t0
    out = Path(a.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    job = CaptionJob(
        inputs=[a.dir],
        prompts=PromptBuilder(family, load_chat_template(a.ckpt)),
        prompt="Describe the audio in detail.",
        max_chunk_s=float(family.max_audio_s),
        sampling=Sampling(temperature=0.0, max_tokens=OUT_TOKENS, ignore_eos=True),
        workers=a.workers,
        queue_size=a.queue_size,
    )
    stats = Stats()
    with Sink(out, "bench", {"bench": True}, model=a.ckpt, task="bench") as sink, GpuBusy() as gpu:
        t1 = time.perf_counter()
        run_pipeline(job, _items(a), engine, sink, stats)
        seconds = time.perf_counter() - t1
    s = stats.snapshot()
    assert s["chunks_failed"] == 0 and s["items_failed"] == 0, s
    return _report(
        "flamingo",
        a,
        s["windows_done"],
        s["audio_s_done"],
        seconds,
        s["prompt_tokens"],
        s["output_tokens"],
        gpu.busy,
        start_s,
        rows=sink.rows_written,
        workers=a.workers,
        replicas=max(1, len(engine.config.devices)),
        gpus=a.gpus,
        replica_threads=getattr(engine, "replica_config", engine.config).replica_threads,
        shard=a.shard,
    )


class NullEngine:
    """Answers every request at once (no model): what flamingo's feed can deliver by itself."""

    def __init__(self, config=None):
        self.config = config
        self.versions, self.defaults = {}, None

    def run(self, feed, sampling, on_step=None):
        from flamingo_cli.engine import END
        from flamingo_cli.records import Result

        while (request := feed.get()) is not END:
            yield Result(chunk=request.chunk, prompt=request.prompt, caption="", prompt_tokens=0, output_tokens=0)

    def abort_all(self):
        pass

    def close(self):
        pass


def cmd_feed(a):
    """The feed alone: decode pool -> chunks -> prompts -> (replica processes) -> sink, no model.

    With --replicas N the requests travel to N replica processes running NullEngine, as they would to
    N GPUs; without, the null engine runs in this process. The GPU work cannot go faster than this.
    """
    import shutil

    from flamingo_cli.data_parallel import DataParallelEngine
    from flamingo_cli.engine import EngineConfig, Sampling
    from flamingo_cli.models import family_for
    from flamingo_cli.pipeline import CaptionJob, Stats, run_pipeline
    from flamingo_cli.prompts import PromptBuilder
    from flamingo_cli.sink import Sink
    from flamingo_cli.sources import iter_items

    family = family_for("af3")
    config = EngineConfig(model="null", family=family, max_chunk_s=600.0, max_in_flight=a.max_in_flight)
    engine = DataParallelEngine(config, [None] * a.replicas, factory="bench:NullEngine") if a.replicas else NullEngine()
    out = Path(a.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    job = CaptionJob(
        inputs=[a.dir],
        prompts=PromptBuilder(family, None),
        prompt="Describe the audio in detail.",
        max_chunk_s=600.0,
        sampling=Sampling(temperature=0.0, max_tokens=OUT_TOKENS),
        workers=a.workers,
        queue_size=a.queue_size,
    )
    stats = Stats()
    try:
        with Sink(out, "bench", {"bench": True}, model="null", task="bench") as sink:
            t1 = time.perf_counter()
            run_pipeline(job, iter_items([a.dir]), engine, sink, stats)
            seconds = time.perf_counter() - t1
    finally:
        engine.close()
    s = stats.snapshot()
    return {
        "mode": "feed",
        "windows": s["windows_done"],
        "seconds": round(seconds, 2),
        "windows_per_s": round(s["windows_done"] / seconds, 1),
        "x_realtime": round(s["audio_s_done"] / seconds, 1),
        "workers": a.workers,
        "replicas": a.replicas or 0,
        "cpus": os.cpu_count(),
    }


def _items(a):
    """The data folder's items, or shard --shard i/N of them (N GPUs each timing its own ceiling)."""
    from flamingo_cli.sources import iter_items, parse_shard, select_shard

    items = iter_items([a.dir])
    return select_shard(items, *parse_shard(a.shard)) if a.shard else items


def _predecoded(a, family):
    from concurrent.futures import ThreadPoolExecutor

    from flamingo_cli.audio import decode
    from flamingo_cli.chunking import chunk_audio

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        decoded = list(pool.map(decode, _items(a)))
    return [c for d in decoded for c in chunk_audio(d, family.max_audio_s)]


def cmd_ceiling(a):
    """Raw vLLM LLM.generate over pre-decoded 16 kHz arrays (decode not timed)."""
    import math

    from vllm import LLM, SamplingParams

    from flamingo_cli.models import family_for
    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    family = family_for(a.ckpt)
    chunks = _predecoded(a, family)
    text = PromptBuilder(family, load_chat_template(a.ckpt)).text("Describe the audio in detail.")
    cfg = _engine_config(a, family)
    kwargs = dict(
        model=a.ckpt,
        max_model_len=cfg.max_model_len,
        limit_mm_per_prompt={"audio": 1},
        dtype="bfloat16",
        gpu_memory_utilization=a.gpu_memory_utilization,
        enforce_eager=a.enforce_eager,
    )
    if a.vllm_defaults_only:
        kwargs.pop("enforce_eager")
    else:
        kwargs["mm_processor_cache_gb"] = 0
        if a.max_num_seqs:
            kwargs["max_num_seqs"] = a.max_num_seqs
        if a.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = a.max_num_batched_tokens
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=OUT_TOKENS, ignore_eos=True)
    prompts = [{"prompt": text, "multi_modal_data": {"audio": (c.samples, 16000)}} for c in chunks]
    with GpuBusy() as gpu:
        t1 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t1
    windows = sum(math.ceil(round(c.end_s - c.start_s, 3) / 30) for c in chunks)
    audio_s = sum(c.end_s - c.start_s for c in chunks)
    ptok = sum(len(o.prompt_token_ids) for o in outs)
    otok = sum(len(o.outputs[0].token_ids) for o in outs)
    return _report(
        "ceiling",
        a,
        windows,
        audio_s,
        seconds,
        ptok,
        otok,
        gpu.busy,
        start_s,
        vllm_defaults_only=a.vllm_defaults_only,
        shard=a.shard,
        gpu=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def cmd_hf(a):
    """transformers batched generate, bf16, sdpa, on 30 s windows."""
    import torch

    from flamingo_cli.models import family_for
    from flamingo_cli.parity import load_reference
    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    family = family_for(a.ckpt)
    chunks = [c for c in _predecoded(a, family) if c.end_s - c.start_s <= 30.0][: a.windows]
    model, processor = load_reference(a.ckpt, "bfloat16", "cuda")
    text = PromptBuilder(family, load_chat_template(a.ckpt)).text("Describe the audio in detail.")
    results = {}
    for bs in a.batch:
        # warm-up batch
        def run(batch):
            inputs = processor(text=[text] * len(batch), audio=[c.samples for c in batch], return_tensors="pt")
            inputs = {
                k: (v.to("cuda", torch.bfloat16) if torch.is_floating_point(v) else v.to("cuda"))
                for k, v in inputs.items()
            }
            with torch.inference_mode():
                return model.generate(**inputs, max_new_tokens=OUT_TOKENS, min_new_tokens=OUT_TOKENS, do_sample=False)

        run(chunks[:bs])
        torch.cuda.synchronize()
        with GpuBusy() as gpu:
            t1 = time.perf_counter()
            for i in range(0, len(chunks) - bs + 1, bs):
                run(chunks[i : i + bs])
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t1
        n = (len(chunks) // bs) * bs
        wps = n / seconds
        results[bs] = {
            "mode": f"hf_batch{bs}",
            "windows": n,
            "seconds": round(seconds, 2),
            "windows_per_s": round(wps, 2),
            "mfu": round(wps * TFLOP_PER_WINDOW / PEAK_TFLOPS, 3),
            "gpu_busy_pct": round(gpu.busy or 0, 1),
        }
    return list(results.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["data", "ckpt", "ceiling", "flamingo", "hf", "feed"])
    ap.add_argument("--dir", default="/tmp/bench-audio")
    ap.add_argument("--windows", type=int, default=2000)
    ap.add_argument("--kind", default="af3")
    ap.add_argument("--out", default="/tmp/af3-full")
    ap.add_argument("--ckpt", default="/tmp/af3-full")
    ap.add_argument("--out-dir", default="/tmp/bench-out")
    ap.add_argument("--results", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--vllm-defaults-only", action="store_true")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--gpus", default=None, help="flamingo mode: as caption --gpus (one replica per GPU)")
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--replica-threads", type=int, default=None, help="torch threads per replica (default: torch's)")
    ap.add_argument("--shard", default=None, help="ceiling/flamingo: only shard i/N of --dir's items")
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--max-in-flight", type=int, default=1024)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    a = ap.parse_args()
    res = {
        "data": cmd_data,
        "ckpt": cmd_ckpt,
        "ceiling": cmd_ceiling,
        "flamingo": cmd_flamingo,
        "hf": cmd_hf,
        "feed": cmd_feed,
    }[a.mode](a)
    for r in res if isinstance(res, list) else [res]:
        line = json.dumps(r)
        print("RESULT " + line, flush=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
