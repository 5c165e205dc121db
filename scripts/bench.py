"""GPU throughput benchmark: flamingo end to end vs raw vLLM vs transformers; data-parallel scaling.

    python scripts/bench.py data --dir /tmp/bench-audio --windows 2000
    python scripts/bench.py ckpt --kind af3 --out /tmp/af3-full
    python scripts/bench.py ceiling  --ckpt /tmp/af3-full --dir /tmp/bench-audio [--max-num-seqs N ...]
    python scripts/bench.py flamingo --ckpt /tmp/af3-full --dir /tmp/bench-audio [--max-num-seqs N ...]
    python scripts/bench.py hf --ckpt /tmp/af3-full --dir /tmp/bench-audio --batch 8 --windows 256
    python scripts/bench.py flamingo --ckpt /tmp/af3-full --dir /tmp/bench-audio --gpus 0,1 --workers 24
    python scripts/bench.py schema --ckpt /tmp/af3-full --dir /tmp/bench-audio [--schema-file F.json]

``schema`` runs flamingo's pipeline twice on one engine over the same clips and max tokens: free text,
then constrained to a JSON Schema (default: the audio-tags preset's); it reports both and their ratio.
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
import sys
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


class CpuBusy:
    """CPU time per thread of this process and its descendants (engine core, replicas) while the block
    runs, from /proc. A thread that spin-waits on CUDA also reads ~100 %, so a busy thread is a suspect,
    not a proof; with --stack-sample the block also collects every process's main-thread stacks, which
    tell the two apart. Linux only; empty elsewhere."""

    def __enter__(self):
        self._samples = os.environ.get("FLAMINGO_STACK_SAMPLE")  # bench.py --stack-sample
        if self._samples:
            for old in Path(self._samples).glob("*.json"):
                old.unlink()
            Path(self._samples, "on").touch()
        self._t0, self._before = time.perf_counter(), _thread_ticks()
        return self

    def __exit__(self, *exc):
        wall = max(1e-9, time.perf_counter() - self._t0)
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        after = _thread_ticks()

        def pct(key, ticks):
            return (ticks - self._before.get(key, (None, None, 0))[2]) / hz / wall * 100

        procs: dict[int, dict] = {}
        for (pid, tid), (pname, tname, ticks) in after.items():
            p = procs.setdefault(pid, {"pid": pid, "name": pname, "cpu_pct": 0.0, "threads": []})
            if tid == 0:  # the process's own total: threads that ended in the block included
                p["cpu_pct"] = round(pct((pid, 0), ticks), 1)
            else:
                p["threads"].append((round(pct((pid, tid), ticks), 1), tname))
        rows = sorted(procs.values(), key=lambda p: -p["cpu_pct"])[:6]
        for p in rows:
            p["threads"] = sorted(p["threads"], reverse=True)[:3]
        self.processes = rows
        top = max(((t[0], f"{p['name']}/{t[1]}") for p in rows for t in p["threads"]), default=(None, None))
        self.busiest_thread_pct, self.busiest_thread = top
        self.stacks = _stack_summary(self._samples) if self._samples else None

    def fields(self) -> dict:
        """What a result row carries of this block."""
        return {
            "busiest_thread_pct": self.busiest_thread_pct,
            "busiest_thread": self.busiest_thread,
            "cpu_processes": self.processes,
            "stacks": self.stacks,
        }


def _stack_summary(folder, top=8):
    """Per process, the main thread's time by innermost function and by innermost three frames, from
    scripts/stacksample's files (written when the flag file goes)."""
    from collections import Counter

    Path(folder, "on").unlink(missing_ok=True)
    seen, deadline = -1, time.monotonic() + 3
    while time.monotonic() < deadline:  # until the processes' files stop arriving
        time.sleep(0.5)
        files = list(Path(folder).glob("*.json"))
        if len(files) == seen:
            break
        seen = len(files)
    out = []
    for f in Path(folder).glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(f.read_text())
            n = rec["samples"] or 1
            leaf, three = Counter(), Counter()
            for stack, c in rec["stacks"].items():
                frames = stack.split(" < ")
                leaf[frames[0].split(":")[0] + ")"] += c
                three[" < ".join(frames[:3])] += c
            out.append(
                {
                    "pid": rec["pid"],
                    "name": rec["name"],
                    "samples": rec["samples"],
                    "leaf": [[round(100 * c / n, 1), k] for k, c in leaf.most_common(top)],
                    "stacks": [[round(100 * c / n, 1), k] for k, c in three.most_common(top)],
                }
            )
    return sorted(out, key=lambda r: -r["samples"])


def _stat(text: str) -> tuple[str, list[str]]:
    """/proc/<pid>[/task/<tid>]/stat: (the name in parentheses, the fields after it: state, ppid, ...)."""
    return text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()


def _ticks(fields: list[str]) -> int:
    return int(fields[11]) + int(fields[12])  # stat fields 14, 15: utime, stime


def _thread_ticks() -> dict:
    """{(pid, tid): (process name, thread name, utime+stime ticks)} for this process and its descendants;
    tid 0 is the whole process (its ended threads included)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    children: dict[int, list[int]] = {}
    for d in proc.iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int(_stat((d / "stat").read_text())[1][1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            pname = (proc / str(pid) / "comm").read_text().strip()
            out[(pid, 0)] = (pname, "", _ticks(_stat((proc / str(pid) / "stat").read_text())[1]))
            for t in (proc / str(pid) / "task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    tname, fields = _stat((t / "stat").read_text())
                    out[(pid, int(t.name))] = (pname, tname, _ticks(fields))
    return out


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
    build_checkpoint(
        a.kind, a.out, size=a.size, dtype="bfloat16" if a.size == "full" else "float32", lm_head_std=a.lm_head_std
    )
    return {"mode": "ckpt", "kind": a.kind, "seconds": round(time.perf_counter() - t0, 1)}


def _engine_config(a, family):
    from flamingo_cli.engine import EngineConfig

    extra = {}
    if a.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = a.max_num_batched_tokens
    return EngineConfig(
        model=a.ckpt,
        family=family,
        mel_device=a.mel_device,
        max_chunk_s=float(family.max_audio_s),
        max_tokens=a.max_tokens,
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
    from flamingo_cli.data_parallel import replica_devices

    return tuple(replica_devices(a.gpus, 1, a.replicas))


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


def _pass(a, engine, family, sampling, out, span=None):
    """One flamingo pass over --dir (items [start, stop) of it) with ``sampling``: totals over every
    generated row (a schema row that failed validation, e.g. truncated at max tokens, still cost its
    tokens), seconds, GPU busy share."""
    import itertools
    import math
    import shutil
    from collections import Counter

    from flamingo_cli.pipeline import CaptionJob, Stats, run_pipeline
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.sink import Sink

    shutil.rmtree(out, ignore_errors=True)
    job = CaptionJob(
        inputs=[a.dir],
        prompts=PromptBuilder(family, load_chat_template(a.ckpt)),
        prompt=a.prompt,
        max_chunk_s=float(family.max_audio_s),
        sampling=sampling,
        workers=a.workers,
        queue_size=a.queue_size,
    )
    stats = Stats()
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}  # the first whole message of each kind: the reason, not just its prefix
    totals = Counter()

    def count(result):
        if result.error:
            kind = result.error.split(":")[0]
            errors[kind] += 1
            samples.setdefault(kind, result.error[:2000])
        if result.output_tokens is None:  # not generated (decode error, rejected): costs nothing
            return
        span = result.chunk.end_s - result.chunk.start_s
        totals.update(
            requests=1,
            windows=max(1, math.ceil(round(span, 3) / 30)),
            audio_s=span,
            prompt_tokens=result.prompt_tokens or 0,
            output_tokens=result.output_tokens,
        )

    with Sink(out, "bench", {"bench": True}, model=a.ckpt, task="bench") as sink, GpuBusy() as gpu, CpuBusy() as cpu:
        t1 = time.perf_counter()
        items = _items(a) if span is None else itertools.islice(_items(a), *span)
        run_pipeline(job, items, engine, sink, stats, on_result=count)
        seconds = time.perf_counter() - t1
    errors_seen = {"counts": dict(errors), "first": samples}
    return stats.snapshot(), totals, seconds, gpu.busy, errors_seen, cpu


def cmd_schema(a):
    """Schema vs free text: the same prompt and max tokens, one engine, each on its own half of the clips
    (after a warm-up on others); what the grammar costs.

    Neither pass ignores EOS (a finished JSON object can only end), so the two may generate different
    numbers of tokens: output tokens/s is the like-for-like number, windows/s what a user sees.
    """
    from flamingo_cli.config import load_preset
    from flamingo_cli.engine import Sampling
    from flamingo_cli.launch import get_engine
    from flamingo_cli.models import family_for
    from flamingo_cli.schema import load_schema, parse_schema

    family = family_for(a.ckpt)
    # Both loaders run `flamingo caption --schema`'s engine check (xgrammar's validator) on this host.
    if a.schema_file:
        schema = load_schema(a.schema_file)
    else:
        preset = load_preset("audio-tags")
        schema = parse_schema(preset.schema, preset.schema_source)
        a.prompt = a.prompt or preset.prompt
    a.prompt = a.prompt or "Describe the audio as JSON."
    t0 = time.perf_counter()
    engine = get_engine(_engine_config(a, family))
    start_s = time.perf_counter() - t0
    rows = []
    # Disjoint clips: the warm-up's, then one half each (the same prompt and audio twice would be served
    # from vLLM's prefix cache the second time).
    warm, halves = _passes(sum(1 for _ in _items(a)), a.warmup, 2)
    for (name, json_schema), span in zip((("free_text", None), ("schema", schema.text)), halves, strict=True):
        sampling = Sampling(temperature=0.0, max_tokens=a.max_tokens, json_schema=json_schema)
        try:
            if warm[1]:  # first-use costs (kernels for new shapes, the grammar's compilation) untimed
                _pass(a, engine, family, sampling, Path(a.out_dir) / f"{name}-warmup", span=warm)
            s, t, seconds, busy, errors, cpu = _pass(a, engine, family, sampling, Path(a.out_dir) / name, span)
        except Exception:
            # The run failed (e.g. the engine refused every request): keep the whole chain, vLLM's frames
            # included, in the row and the log, and go on (the other pass's numbers stand).
            import traceback

            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            rows.append({"mode": f"schema:{name}", "failed": tb[-6000:], "mel_device": a.mel_device})
            if not getattr(engine, "alive", lambda: True)():
                break
            continue
        rows.append(
            _report(
                f"schema:{name}",
                a,
                t["windows"],
                t["audio_s"],
                seconds,
                t["prompt_tokens"],
                t["output_tokens"],
                busy,
                start_s,
                requests=t["requests"],
                mean_output_tokens=round(t["output_tokens"] / max(1, t["requests"]), 1),
                rows_ok=s["chunks_done"],
                rows_failed=s["chunks_failed"],
                errors=errors,
                max_tokens=a.max_tokens,
                schema_hash=schema.hash if json_schema else None,
                mel_device=a.mel_device,
                **cpu.fields(),
            )
        )
    engine.close()
    if len(rows) == 2 and all("failed" not in r for r in rows):
        free, constrained = rows
        for key in ("windows_per_s", "output_tok_s"):
            constrained[f"{key}_vs_free_text"] = round(constrained[key] / free[key], 3) if free[key] else None
    return rows


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


def cmd_grammar(a):
    """What a JSON schema costs xgrammar per decoding step, on this CPU: the grammar's compile time and
    the time to fill one sequence's token mask, for the schema as given and without its string length
    bounds (maxLength/minLength). --sequences random walks of --max-tokens steps, each step a token drawn
    uniformly from those the mask allows (as random weights do: strings run long). The tokenizer is
    --ckpt's when it has one, else flamingo's full-size test tokenizer (152 k ids, Qwen2's specials)."""
    import random

    import numpy as np
    import xgrammar as xgr

    from flamingo_cli.checkpoints import REAL_VOCAB_SIZE, build_tokenizer
    from flamingo_cli.config import load_preset
    from flamingo_cli.schema import STRING_BOUNDS

    if Path(a.ckpt, "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.ckpt)
    else:
        tok = build_tokenizer(REAL_VOCAB_SIZE)
    schema = json.loads(Path(a.schema_file).read_text()) if a.schema_file else load_preset("audio-tags").schema

    def unbounded(node):
        if isinstance(node, dict):
            return {k: unbounded(v) for k, v in node.items() if k not in STRING_BOUNDS}
        return [unbounded(v) for v in node] if isinstance(node, list) else node

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    rows = []
    for name, variant in [("as given", schema), ("no string bounds", unbounded(schema))]:
        t0 = time.perf_counter()
        compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(variant))
        compile_s = time.perf_counter() - t0
        rng, times = random.Random(0), []
        for _ in range(a.sequences):
            matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)
            for _ in range(a.max_tokens):
                if matcher.is_terminated():
                    break
                t1 = time.perf_counter()
                matcher.fill_next_token_bitmask(mask)
                times.append(time.perf_counter() - t1)
                allowed = np.flatnonzero(np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: len(tok)])
                assert matcher.accept_token(int(allowed[rng.randrange(len(allowed))]))
        ms = 1e3 * np.asarray(times)
        rows.append(
            {
                "mode": "grammar",
                "schema": name,
                "compile_s": round(compile_s, 3),
                "steps": len(times),
                "mask_ms_mean": round(float(ms.mean()), 4),
                "mask_ms_p50": round(float(np.median(ms)), 4),
                "mask_ms_p99": round(float(np.percentile(ms, 99)), 4),
                "vocab": info.vocab_size,
                "equal_schemas": variant == schema,
            }
        )
    return rows


def cmd_frontend(a):
    """Where vLLM's front-end process spends its time per request (issue 14: at ~50 requests/s the GPU
    waits on it): cProfile of ``add_request`` for every chunk of --dir in the calling process (input
    processing: the HF processor call, tokenisation, the features, hashing, validation; the hand-off to
    the engine core). Outputs are not read; the engine core process works on the requests meanwhile, as
    in a run. Top functions by cumulative time.
    """
    import cProfile
    import io
    import pstats

    from flamingo_cli.engine import Sampling
    from flamingo_cli.launch import get_engine
    from flamingo_cli.models import family_for
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.records import Request

    family = family_for(a.ckpt)
    chunks = _predecoded(a, family)
    prompt = "Describe the audio in detail."
    text = PromptBuilder(family, load_chat_template(a.ckpt)).text(prompt)
    engine = get_engine(_engine_config(a, family))
    sampling = Sampling(temperature=0.0, max_tokens=a.out_tokens, ignore_eos=True)
    requests = [Request(chunk=c, prompt=prompt, text=text) for c in chunks]
    for r in requests[: a.warmup]:
        engine._add(r, sampling)
    timed = requests[a.warmup :]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for r in timed:
        engine._add(r, sampling)
    prof.disable()
    seconds = time.perf_counter() - t0
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    print(out.getvalue(), file=sys.stderr)
    engine.abort_all()
    engine.close()
    return {
        "mode": "frontend",
        "requests": len(timed),
        "seconds": round(seconds, 3),
        "ms_per_request": round(1000 * seconds / max(1, len(timed)), 2),
        "requests_per_s_ceiling": round(len(timed) / seconds, 1) if seconds else None,
        "mel_device": a.mel_device,
        "device": _device_name(),
    }


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


# --- suite: one engine per variant, every workload timed through it (issue 14 / 15 lease) -------------

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4}  # dense BF16 spec (SXM); the MFU base
VARIANTS = ("raw", "flamingo", "fullfeat", "cpumel", "untrimmed", "fp8", "fp8kv", "replica", "replica2")


def cmd_clips(a):
    """--count files of --seconds each (MP3/FLAC, mixed rates and channels) under --dir."""
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    kinds = [(".mp3", 44100, 2), (".flac", 48000, 1), (".mp3", 22050, 1), (".flac", 16000, 2), (".flac", 44100, 2)]
    jobs = [(str(root / f"{i:05d}{kinds[i % 5][0]}"), a.seconds, *kinds[i % 5][1:], i) for i in range(a.count)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_one, jobs, chunksize=8))
    return {
        "mode": "clips",
        "dir": a.dir,
        "files": a.count,
        "seconds_each": a.seconds,
        "s": round(time.perf_counter() - t0, 1),
    }


def _passes(n, warmup, repeat):
    """(start, stop) of the warm-up and of each timed pass over n items, all disjoint: vLLM's prefix
    cache (on by default) and raw vLLM's multimodal cache would serve a repeated clip from memory (a
    second raw pass over the same clips ran 7x faster in a CPU smoke test)."""
    warm = min(warmup, n // (repeat + 1))
    k = (n - warm) // repeat
    return (0, warm), [(warm + i * k, warm + (i + 1) * k) for i in range(repeat)]


def _durations(folder):
    """Each file's length in 16 kHz samples (what the model sees after resampling), sorted by name."""
    import soundfile as sf

    from flamingo_cli.sources import iter_items

    out = []
    for item in iter_items([folder]):
        info = sf.info(item.path)
        out.append(round(info.frames * 16000 / info.samplerate))
    return out


def needed_tflop(ckpt, samples, prompt_tokens, output_tokens, cap_s):
    """FLOPs the model needs for a workload: encoder on each window's valid frames (trimmed), the
    projector, LM prefill and decode with causal attention. From the checkpoint's config.json."""
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    au, tx = cfg["audio_config"], cfg["text_config"]
    d, f, el = au["hidden_size"], au["intermediate_size"], au["num_hidden_layers"]
    mel = au.get("num_mel_bins", 128)
    h, i_, ll = tx["hidden_size"], tx["intermediate_size"], tx["num_hidden_layers"]
    kv = tx["num_key_value_heads"] * (h // tx["num_attention_heads"])
    vocab = tx["vocab_size"]
    enc = 0.0
    chunks = []
    for n in samples:  # flamingo chunks at the model's cap; raw vLLM gets the same chunks
        while n > 0:
            chunks.append(min(n, int(cap_s * 16000)))
            n -= chunks[-1]
    for n in chunks:
        for w in range(0, n, 480000):
            frames = min(3000, -(-min(480000, n - w) // 160))
            pos = (frames - 1) // 2 + 1
            tok = (pos - 2) // 2 + 1
            enc += 2 * 3 * (mel * d * frames + d * d * pos)  # conv1, conv2
            enc += el * (pos * (8 * d * d + 4 * d * f) + 4 * d * pos * pos)
            enc += 2 * (d * h + h * h) * max(tok, 0)  # projector
    reqs = max(1, len(chunks))
    p, o = prompt_tokens / reqs, output_tokens / reqs
    per_tok = 2 * ll * (h * (h + 2 * kv) + h * h + 3 * h * i_)
    lm = (prompt_tokens + output_tokens) * per_tok + output_tokens * 2 * h * vocab
    lm += reqs * 4 * ll * h * (p * p / 2 + o * p + o * o / 2)  # causal attention
    return (enc + lm) / 1e12


def _suite_config(a, family, cap_s):
    from dataclasses import replace

    cfg = _engine_config(a, family)
    return replace(
        cfg,
        max_chunk_s=cap_s,
        max_tokens=a.out_tokens,
        devices=(),
        quantization="fp8" if a.variant == "fp8" else None,
        kv_cache_dtype="fp8" if a.variant == "fp8kv" else "auto",
        trim_encoder=a.variant != "untrimmed",
        mel_device="cpu" if a.variant == "cpumel" else "auto",  # auto: flamingo's default (GPU on a GPU host)
        dtype="auto" if _on_cpu() else "bfloat16",
    )


def _on_cpu():
    # flamingo's check (NVML's count): torch's CUDA runtime check would keep vLLM from forking its
    # engine process, which a plain script (that never asks torch) gets
    from flamingo_cli.engine import has_cuda

    return not has_cuda()


def _workloads(a):
    out = []
    for spec in a.workloads.split(","):
        name, folder = spec.split("=", 1)
        out.append((name, folder))
    return out


def cmd_suite(a):
    """Each --workloads folder through one --variant engine, timed after a warm-up.

    raw: vLLM's LLM(model=ckpt) with its defaults (bf16, flamingo's plugin not loaded: VLLM_PLUGINS=""),
    LLM.generate over pre-decoded arrays, one engine for every workload. flamingo (its defaults: trimmed
    encoder, compact features, log-mel on the GPU), fullfeat (the full 30-s log-mel windows sent to the
    engine core), cpumel, untrimmed, fp8, fp8kv: flamingo's pipeline from the files on
    disk, one engine per audio-window count sized as `flamingo caption` sizes it from its plan (10-s and
    30-s clips share a 30-s engine, 5-minute tracks get a 300-s one). replica: flamingo through one
    data-parallel replica process (issue 15); replica2: two replicas sharing the GPU, memory split.
    """
    import math

    from flamingo_cli.models import family_for

    family = family_for(a.ckpt)
    workloads = _workloads(a)
    samples = {name: _durations(folder) for name, folder in workloads}
    longest = {name: float(min(family.max_audio_s, -(-max(s) // 16000))) for name, s in samples.items()}
    if a.variant == "raw":
        groups = [(max(longest.values()), workloads)]
    else:
        by_windows: dict[int, list] = {}
        for name, folder in workloads:
            by_windows.setdefault(math.ceil(longest[name] / 30), []).append((name, folder))
        groups = [(max(longest[n] for n, _ in g), g) for _, g in sorted(by_windows.items())]
    peak = a.peak_tflops
    results = []

    def emit(r):
        results.append(r)
        print("RESULT " + json.dumps(r), flush=True)
        if a.results:
            with open(a.results, "a") as fh:
                fh.write(json.dumps(r) + "\n")

    for gi, (cap_s, group) in enumerate(groups):
        t0 = time.perf_counter()
        if a.variant == "raw":
            # vLLM alone: no flamingo plugin (vLLM loads only the general plugins VLLM_PLUGINS names, and
            # no plugin is named ""), so its in-tree AF3/MF classes run; before 2026-12-07 (evening) the
            # raw rows ran flamingo's registered class with trimming off
            os.environ["VLLM_PLUGINS"] = ""
            os.environ["FLAMINGO_TRIM_ENCODER"] = "0"
            from vllm import LLM

            llm = LLM(model=a.ckpt, **({"max_model_len": 8192} if _on_cpu() else {}))
            engine = None
        else:
            if a.variant == "fullfeat":  # every engine process inherits it: the front-end sends whole windows
                os.environ["FLAMINGO_COMPACT_FEATURES"] = "0"
            engine = _suite_engine(a, family, cap_s)
            llm = getattr(engine, "llm", None)
        start_s = time.perf_counter() - t0
        try:
            for name, folder in group:
                if a.variant == "raw":
                    r = _raw_workload(a, llm, family, folder)
                else:
                    r = _flamingo_workload(a, engine, family, folder, name)
                tflop = needed_tflop(a.ckpt, samples[name], r["prompt_tokens"], r["output_tokens"], family.max_audio_s)
                r.update(
                    mode="suite",
                    variant=a.variant,
                    workload=name,
                    model=family.name,
                    out_tokens=a.out_tokens,
                    engine_start_s=round(start_s, 1),
                    tflop_needed=round(tflop, 3),
                    mfu_needed=round(tflop / r["seconds"] / peak, 3) if peak else None,
                    peak_tflops=peak,
                    max_chunk_s=cap_s,
                    device=_device_name(),
                )
                emit(r)
            last = gi == len(groups) - 1  # the largest engine: every workload's chunks fit
            if last and a.quality_dir and a.variant in ("flamingo", "fp8", "fp8kv"):
                emit(_quality(a, llm if llm is not None else engine.llm, family, workloads))
        finally:
            if engine is not None:
                engine.close()
            elif llm is not None:
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
    return []  # already printed and written one by one (a later failure keeps the earlier rows)


def _suite_engine(a, family, cap_s):
    config = _suite_config(a, family, cap_s)
    if a.variant in ("replica", "replica2"):
        from flamingo_cli.data_parallel import DataParallelEngine, replica_devices

        # replica: one replica process on GPU 0; replica2: two sharing it (`caption --gpus 0 --replicas 2`)
        count = 2 if a.variant == "replica2" else 1
        return DataParallelEngine(config, replica_devices("none" if _on_cpu() else "0", 1, count))
    from flamingo_cli.launch import get_engine

    return get_engine(config)


def _device_name():
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def _raw_workload(a, llm, family, folder):
    import math

    from vllm import SamplingParams

    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    a.dir, a.shard = folder, None
    chunks = _predecoded(a, family)
    text = PromptBuilder(family, load_chat_template(a.ckpt)).text("Describe the audio in detail.")
    sp = SamplingParams(temperature=0.0, max_tokens=a.out_tokens, ignore_eos=True)
    prompts = [{"prompt": text, "multi_modal_data": {"audio": (c.samples, 16000)}} for c in chunks]
    (w0, w1), timed = _passes(len(prompts), a.warmup, a.repeat)
    llm.generate(prompts[w0:w1], sp, use_tqdm=False)
    rows = []
    for i, j in timed:
        windows = sum(math.ceil(round(c.end_s - c.start_s, 3) / 30) for c in chunks[i:j])
        with GpuBusy() as gpu, CpuBusy() as cpu:
            t1 = time.perf_counter()
            outs = llm.generate(prompts[i:j], sp, use_tqdm=False)
            seconds = time.perf_counter() - t1
        rows.append(_row(windows, j - i, seconds, gpu, outs=outs, cpu=cpu))
    return _median_pass(rows)


def _median_pass(rows):
    """The median timed pass (by windows/s) of a workload, with every pass's windows/s beside it: one
    ~15-s pass cannot separate ±10 % effects (two 2026-12-02 leases differed by 14 % on one path)."""
    ranked = sorted(rows, key=lambda r: r["windows_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["passes_windows_per_s"] = [r["windows_per_s"] for r in rows]
    return row


def _row(windows, requests, seconds, gpu, outs=None, prompt_tokens=0, output_tokens=0, cpu=None):
    if outs is not None:
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "windows": windows,
        "requests": requests,
        "seconds": round(seconds, 2),
        "windows_per_s": round(windows / seconds, 2),
        "requests_per_s": round(requests / seconds, 2),
        "output_tok_s": round(output_tokens / seconds),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "gpu_busy_pct": round(gpu.busy, 1) if gpu.busy is not None else None,
        "gpu_samples": len(gpu.samples),
        **(cpu.fields() if cpu is not None else {}),
    }


def _flamingo_workload(a, engine, family, folder, name):
    import itertools
    import shutil

    from flamingo_cli.engine import Sampling
    from flamingo_cli.pipeline import CaptionJob, Stats, run_pipeline
    from flamingo_cli.prompts import PromptBuilder, load_chat_template
    from flamingo_cli.sink import Sink
    from flamingo_cli.sources import iter_items

    job = CaptionJob(
        inputs=[folder],
        prompts=PromptBuilder(family, load_chat_template(a.ckpt)),
        prompt="Describe the audio in detail.",
        max_chunk_s=float(family.max_audio_s),
        sampling=Sampling(temperature=0.0, max_tokens=a.out_tokens, ignore_eos=True),
        workers=a.workers,
        queue_size=a.queue_size,
    )
    rows = []
    warm, timed = _passes(sum(1 for _ in iter_items([folder])), a.warmup, a.repeat)
    for i, (phase, (start, stop)) in enumerate([("warmup", warm)] + [("timed", t) for t in timed]):
        out = Path(a.out_dir) / f"{a.variant}-{name}-{phase}{i}"
        shutil.rmtree(out, ignore_errors=True)
        items = itertools.islice(iter_items([folder]), start, stop)
        stats = Stats()
        with (
            Sink(out, "bench", {"bench": True}, model=a.ckpt, task="bench") as sink,
            GpuBusy() as gpu,
            CpuBusy() as cpu,
        ):
            t1 = time.perf_counter()
            run_pipeline(job, items, engine, sink, stats)
            seconds = time.perf_counter() - t1
        s = stats.snapshot()
        assert s["chunks_failed"] == 0 and s["items_failed"] == 0, s
        if phase == "timed":
            rows.append(
                _row(
                    s["windows_done"],
                    s["chunks_done"],
                    seconds,
                    gpu,
                    prompt_tokens=s["prompt_tokens"],
                    output_tokens=s["output_tokens"],
                    cpu=cpu,
                )
            )
    return _median_pass(rows)


def _quality(a, llm, family, workloads):
    """Greedy agreement and teacher-forced log-prob deltas against the bf16 run (--variant flamingo).

    bf16 writes its greedy tokens and its log-probs of them (scored as a prompt, prefill numerics);
    a later fp8 run scores the same token sequences and generates its own greedy tokens.
    """
    from vllm import SamplingParams

    from flamingo_cli.prompts import PromptBuilder, load_chat_template

    chunks = []
    for _, folder in workloads:
        a.dir, a.shard = folder, None
        chunks += [c for c in _predecoded(a, family)][: a.quality_n // len(workloads) or 1]
    text = PromptBuilder(family, load_chat_template(a.ckpt)).text("Describe the audio in detail.")
    audio = [{"audio": (c.samples, 16000)} for c in chunks]
    greedy = SamplingParams(temperature=0.0, max_tokens=a.quality_tokens)
    gen = llm.generate([{"prompt": text, "multi_modal_data": m} for m in audio], greedy, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in gen]
    qdir = Path(a.quality_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    ref_path = qdir / f"{family.name}-bf16.json"
    # --quality-recheck: a second bf16 engine scores against the first one's file, the noise floor that
    # fp8's deltas are read against (batching and kernel choice alone move bf16 log-probs).
    writes = a.variant == "flamingo" and not a.quality_recheck
    ref = tokens if writes else json.loads(ref_path.read_text())["tokens"]
    base = llm.get_tokenizer().encode(text)
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    scored = llm.generate(
        [{"prompt_token_ids": base + list(t), "multi_modal_data": m} for t, m in zip(ref, audio, strict=True)],
        score,
        use_tqdm=False,
    )
    logprobs = []
    for t, o in zip(ref, scored, strict=True):
        tail = o.prompt_logprobs[len(o.prompt_logprobs) - len(t) :]
        logprobs.append([float(pl[tok].logprob) for pl, tok in zip(tail, t, strict=True)])
    row = {
        "mode": "quality",
        "variant": a.variant + ("-recheck" if a.quality_recheck else ""),
        "model": family.name,
        "sequences": len(tokens),
        "steps": a.quality_tokens,
    }
    if writes:
        ref_path.write_text(json.dumps({"tokens": tokens, "logprobs": logprobs}))
        row["written"] = str(ref_path)
        row["mean_logprob"] = round(sum(map(sum, logprobs)) / max(1, sum(map(len, logprobs))), 4)
        return row
    ref_lp = json.loads(ref_path.read_text())["logprobs"]
    deltas = sorted(abs(x - y) for u, v in zip(logprobs, ref_lp, strict=True) for x, y in zip(u, v, strict=True))
    first = [
        next((i for i, (x, y) in enumerate(zip(t, r, strict=False)) if x != y), None)
        for t, r in zip(tokens, ref, strict=True)
    ]
    row.update(
        teacher_forced_abs_dlogp_mean=round(sum(deltas) / len(deltas), 5),
        teacher_forced_abs_dlogp_p50=round(deltas[len(deltas) // 2], 5),
        teacher_forced_abs_dlogp_p99=round(deltas[int(len(deltas) * 0.99)], 5),
        teacher_forced_abs_dlogp_max=round(deltas[-1], 5),
        greedy_identical_sequences=sum(f is None for f in first),
        greedy_token_agreement=round(
            sum(x == y for t, r in zip(tokens, ref, strict=True) for x, y in zip(t, r, strict=False))
            / sum(map(len, ref)),
            4,
        ),
        greedy_first_mismatch_median=sorted(f for f in first if f is not None)[
            len([f for f in first if f is not None]) // 2
        ]
        if any(f is not None for f in first)
        else None,
        ref_mean_logprob=round(sum(map(sum, ref_lp)) / max(1, sum(map(len, ref_lp))), 4),
    )
    return row


def _busiest(r):
    """'97 (python)': the busiest thread's share of one core and its process, if the row has it."""
    if r.get("busiest_thread_pct") is None:
        return "-"
    return f"{r['busiest_thread_pct']:.0f} ({str(r.get('busiest_thread') or '').split('/')[0]})"


def cmd_report(a):
    """Markdown table from --results: each variant's windows/s and its ratio to raw vLLM per workload."""
    rows = [json.loads(line) for line in Path(a.results).read_text().splitlines() if line.strip()]
    speed = [r for r in rows if r.get("mode") == "suite"]
    lines = [
        "| model | workload | variant | windows/s | req/s | x raw vLLM | GPU busy % | MFU (needed FLOPs) "
        "| busiest CPU thread % | start s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        raw = next(
            (x for x in speed if x["variant"] == "raw" and x["workload"] == r["workload"] and x["model"] == r["model"]),
            None,
        )
        ratio = f"{r['windows_per_s'] / raw['windows_per_s']:.2f}" if raw else "-"
        passes = r.get("passes_windows_per_s") or []
        spread = f" ({min(passes)}–{max(passes)})" if len(passes) > 1 else ""
        lines.append(
            f"| {r['model']} | {r['workload']} ({r['out_tokens']} tok) | {r['variant']} | "
            f"{r['windows_per_s']}{spread} | "
            f"{r['requests_per_s']} | {ratio} | {r['gpu_busy_pct']} | {r['mfu_needed']} | "
            f"{_busiest(r)} | {r['engine_start_s']} |"
        )
    for r in speed:  # what each engine core's main thread did in the timed pass (--stack-sample)
        for proc in r.get("stacks") or []:
            if "EngineCor" in proc["name"]:
                top = "; ".join(f"{share}% {name}" for share, name in proc["leaf"][:5])
                lines.append(f"\nengine core {r['model']} {r['workload']} {r['variant']} (pid {proc['pid']}): {top}")
    for r in rows:
        if r.get("mode") == "quality":
            lines.append(
                f"\nquality {r['model']} {r['variant']}: "
                + json.dumps({k: v for k, v in r.items() if k not in ("mode",)})
            )
    print("\n".join(lines))
    return []


def _start_stack_sampling(folder):
    """Every Python process started from here loads scripts/stacksample/sitecustomize.py (PYTHONPATH);
    this one starts its sampler directly. CpuBusy's timed passes switch sampling on and read it."""
    import importlib.util

    folder = str(Path(folder).resolve())
    Path(folder).mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent / "stacksample"
    os.environ["FLAMINGO_STACK_SAMPLE"] = folder
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), os.environ.get("PYTHONPATH")) if p)
    spec = importlib.util.spec_from_file_location("flamingo_stacksample", here / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # starts the sampler: the variable is set


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "mode",
        choices=[
            "data",
            "ckpt",
            "ceiling",
            "flamingo",
            "hf",
            "feed",
            "clips",
            "suite",
            "report",
            "schema",
            "frontend",
            "grammar",
        ],
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="clips: length of each file")
    ap.add_argument("--count", type=int, default=1000, help="clips: number of files")
    ap.add_argument("--size", default="full", help="ckpt: full or tiny")
    ap.add_argument("--lm-head-std", type=float, default=None, help="ckpt: sharpen the output layer (quality runs)")
    ap.add_argument("--variant", choices=VARIANTS, default="flamingo", help="suite: which engine")
    ap.add_argument("--workloads", default="10s=/tmp/bench-10s,30s=/tmp/bench-30s,5min=/tmp/bench-5min")
    ap.add_argument("--out-tokens", type=int, default=OUT_TOKENS)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument(
        "--stack-sample", default=None, help="sample every process's main-thread stack in timed passes, files here"
    )
    ap.add_argument("--repeat", type=int, default=1, help="suite: timed passes per workload (the median is reported)")
    ap.add_argument("--quality-dir", default=None, help="suite: also measure fp8-vs-bf16 quality, files here")
    ap.add_argument("--quality-n", type=int, default=48)
    ap.add_argument("--quality-tokens", type=int, default=64)
    ap.add_argument("--quality-recheck", action="store_true", help="suite flamingo: compare with the bf16 file")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="dense BF16 peak for MFU (H100/H200 SXM)")
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
    ap.add_argument("--max-in-flight", type=int, default=None)  # None: flamingo's default (engine.in_flight_cap)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    ap.add_argument("--schema-file", default=None, help="schema mode: a JSON Schema (default: audio-tags')")
    ap.add_argument("--prompt", default=None, help="schema mode: the prompt (default: the audio-tags preset's)")
    ap.add_argument("--max-tokens", type=int, default=OUT_TOKENS, help="schema/grammar mode: tokens per request")
    ap.add_argument("--sequences", type=int, default=8, help="grammar mode: random walks per schema")
    ap.add_argument("--mel-device", default="auto", help="schema/flamingo mode: as caption --mel-device")
    a = ap.parse_args()
    modes = {
        "data": cmd_data,
        "ckpt": cmd_ckpt,
        "ceiling": cmd_ceiling,
        "flamingo": cmd_flamingo,
        "hf": cmd_hf,
        "feed": cmd_feed,
        "clips": cmd_clips,
        "suite": cmd_suite,
        "report": cmd_report,
        "schema": cmd_schema,
        "frontend": cmd_frontend,
        "grammar": cmd_grammar,
    }
    if a.stack_sample:
        _start_stack_sampling(a.stack_sample)
    res = modes[a.mode](a)
    for r in res if isinstance(res, list) else [res]:
        line = json.dumps(r)
        print("RESULT " + line, flush=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
