"""CPU-side benchmark (issue 4): decode speed per core, host memory of big runs, CLI start-up.

Every subcommand makes its own inputs under --dir (deterministic, reused when present), prints one
JSON line per result (``RESULT {...}``) and appends it to --results when given:

    python scripts/bench_cpu.py decode   --dir D                    # MP3/FLAC/WAV: flamingo vs librosa, per core
    python scripts/bench_cpu.py mix      --dir D --workers 1,2      # the H100 run's file mix: windows/s
    python scripts/bench_cpu.py mel      --threads 1                # Whisper log-mel (vLLM's side) per window
    python scripts/bench_cpu.py manifest --dir D --rows 1000000     # 1M-row manifest through `flamingo caption`
    python scripts/bench_cpu.py manifest --dir D --rows 1000000 --resume   # the same again: all skipped
    python scripts/bench_cpu.py long     --dir D --what decode [--decoder librosa]   # a 3-hour track alone
    python scripts/bench_cpu.py long     --dir D --what pipeline --model af3|mf [--copies N --pace W]
    python scripts/bench_cpu.py help     --runs 5                   # `flamingo --help` wall time

Speeds are per core: audio seconds decoded per CPU second of this process (``time.process_time``),
single-threaded unless --workers says otherwise, so a busy neighbour on a shared machine inflates the
wall time but not the figure. Memory is the process's resident set from /proc/self/status: the peak
(VmHWM, reset through /proc/self/clear_refs after imports where the kernel allows it) and a sampled
curve. ``manifest`` and ``long`` run the real ``flamingo caption`` in-process (``cli.main``) with
a fake engine injected (``Environment(engine=...)``), so every stage but the model runs: sources, resume
index, stat/fingerprint, decode pool, chunking, prompts, the bounded feed, Parquet sink. The fake
answers at once (``manifest``), or (``long``, by default) keeps requests in flight up to flamingo's
engine caps and finishes --pace windows/s, like a GPU that is slower than the decode pool.
Timings belong under ``flock /tmp/flamingo-engine.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
H100_WINDOWS_PER_S = 29.5  # BENCHMARKS.md: raw-vLLM ceiling on one H100 (flamingo itself: 28.6-30.3)
DECODE_CONFIGS = [(22050, 1), (44100, 2), (48000, 1), (48000, 2)]  # (rate, channels)
DECODE_FORMATS = {"mp3": "MPEG_LAYER_III", "flac": "PCM_16", "wav": "PCM_16"}


# --- measuring ---------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_mb() <= rss_mb() + 1


class Sampler(threading.Thread):
    """RSS every ``interval`` seconds, with a progress number from ``progress()``."""

    def __init__(self, progress=lambda: 0, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.progress, self.interval = progress, interval
        self.samples: list[tuple[float, int, float]] = []
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.perf_counter() - self.t0, int(self.progress()), rss_mb()))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.samples.append((time.perf_counter() - self.t0, int(self.progress()), rss_mb()))

    def max_upto(self, n: int) -> float | None:
        """Largest RSS sampled while progress was still <= n."""
        vals = [r for _, p, r in self.samples if p <= n]
        return round(max(vals), 1) if vals else None

    def curve(self, points: int = 12) -> list[list[float]]:
        step = max(1, len(self.samples) // points)
        picked = [*self.samples[::step], self.samples[-1]]
        return [[round(t, 1), p, round(r, 1)] for t, p, r in picked]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("flamingo-cli", "numpy", "soundfile", "soxr", "librosa", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    import soundfile

    import flamingo_cli

    out["libsndfile"] = soundfile.__libsndfile_version__
    out["flamingo_cli_dir"] = str(Path(flamingo_cli.__file__).parent)
    return out


def machine() -> str:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


# --- inputs ------------------------------------------------------------------------------------------


def _signal(seconds: float, sr: int, channels: int, seed: int, start: int = 0):
    """A gliding tone plus noise (like scripts/bench.py), float32 (frames, channels)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    t = (np.arange(n) + start) / sr
    f0 = 110 + 40 * (seed % 7)
    x = 0.25 * np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * 0.2 * t)) + 0.05 * rng.standard_normal(n)
    if channels == 1:
        return x.astype(np.float32)[:, None]
    return np.stack([x, np.roll(x, 7)], axis=1).astype(np.float32)


def write_audio(path: Path, seconds: float, sr: int, channels: int, seed: int, block_s: float = 60.0) -> Path:
    """Write block by block (a 3-hour file never sits in memory), via a temp name: atomic."""
    import soundfile as sf

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lstrip(".").lower()
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = {"mp3": "MP3", "flac": "FLAC", "wav": "WAV"}[ext]
    with sf.SoundFile(tmp, "w", samplerate=sr, channels=channels, format=fmt, subtype=DECODE_FORMATS[ext]) as f:
        done = 0.0
        while done < seconds:
            step = min(block_s, seconds - done)
            f.write(_signal(step, sr, channels, seed, start=round(done * sr)))
            done += step
    os.replace(tmp, path)
    return path


def decode_set(root: Path, seconds: float) -> list[Path]:
    """Per format, one file per (rate, channels) config: MP3 (LAME), FLAC and WAV (16-bit PCM)."""
    files = []
    for ext in DECODE_FORMATS:
        for i, (sr, ch) in enumerate(DECODE_CONFIGS):
            name = f"{ext}-{sr}-{'stereo' if ch == 2 else 'mono'}-{int(seconds)}s.{ext}"
            files.append(write_audio(root / "decode" / name, seconds, sr, ch, seed=i))
    return files


def mix_set(root: Path, windows: int) -> Path:
    """scripts/bench.py's own generator (the H100 run's workload), its first ``windows`` windows."""
    import importlib.util

    folder = root / f"mix-{windows}w"
    marker = folder / ".done"
    if not marker.exists():
        spec = importlib.util.spec_from_file_location("flamingo_bench", REPO / "scripts" / "bench.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench  # its process pool pickles bench._write_one by module name
        spec.loader.exec_module(bench)
        bench.cmd_data(argparse.Namespace(dir=str(folder), windows=windows))
        marker.write_text("ok\n")
    return folder


def tiny_set(root: Path, count: int) -> Path:
    """``count`` real 1-second 16 kHz mono WAV files that a big manifest points at round-robin."""
    folder = root / f"tiny-{count}"
    marker = folder / ".done"
    if not marker.exists():
        for i in range(count):
            write_audio(folder / f"{i:05d}.wav", 1.0, 16000, 1, seed=i)
        marker.write_text("ok\n")
    return folder


def big_manifest(root: Path, rows: int, tiny: int, fmt: str) -> Path:
    """``rows`` distinct ids; paths point round-robin at ``tiny`` real files; one passthrough column."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = tiny_set(root, tiny)
    path = root / f"manifest-{rows}-{tiny}.{fmt}"
    if path.exists():
        return path
    rel = os.path.relpath(folder, root)
    paths = [f"{rel}/{i:05d}.wav" for i in range(tiny)]
    table = pa.table(
        {
            "id": [f"utt{i:08d}" for i in range(rows)],
            "path": [paths[i % tiny] for i in range(rows)],
            "split": ["train" if i % 10 else "dev" for i in range(rows)],
        }
    )
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "parquet":
        pq.write_table(table, tmp, compression="zstd")
    else:
        pacsv.write_csv(table, tmp)
    os.replace(tmp, path)
    return path


def in_child(fn, *args: Any) -> Any:
    """Make inputs in a forked child, so their memory never counts in this process's RSS."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def long_track(root: Path, hours: float, fmt: str, sr: int, channels: int) -> Path:
    name = f"long-{hours:g}h-{sr}-{'stereo' if channels == 2 else 'mono'}.{fmt}"
    return write_audio(root / name, hours * 3600, sr, channels, seed=3, block_s=120.0)


# --- the fake engine behind the real CLI ----------------------------------------------------------------


class InstantEngine:
    """A model-free engine (like tests/test_reliability.py's FakeEngine) that answers in feed order.

    ``hold_audio_s``/``hold_requests`` > 0 make it keep requests in flight the way flamingo's vLLM engine
    does (EngineConfig.max_in_flight_audio_s / max_in_flight) before answering the oldest, so the chunk
    arrays a real engine holds count in RSS; 0 answers each request at once and keeps nothing.
    ``pace`` > 0 finishes at most that many 30 s windows per second (an H100: 29.5), so the feed and the
    decode pool fill up as they do when the GPU, not the decode, is the bottleneck.
    """

    def __init__(self, hold_audio_s: float = 0.0, hold_requests: int = 0, pace: float = 0.0) -> None:
        self.versions = {"vllm": "fake"}
        self.results = 0
        self.hold_audio_s, self.hold_requests = hold_audio_s, hold_requests
        self.pace = pace  # windows/s the fake finishes at (0: as fast as asked)
        self.windows = 0
        self.t0: float | None = None
        self.max_held_s = 0.0

    def effective_sampling(self, sampling: Any) -> dict[str, Any]:
        return sampling.identity()

    def _answer(self, request: Any, on_step: Any = None):
        from flamingo_cli.records import Result

        if self.pace > 0:
            span = request.chunk.end_s - request.chunk.start_s
            self.windows += max(1, math.ceil(round(span, 3) / 30))
            if self.t0 is None:
                self.t0 = time.perf_counter()
            while (wait := self.windows / self.pace - (time.perf_counter() - self.t0)) > 0:
                time.sleep(min(wait, 0.05))
                if on_step:
                    on_step()
        self.results += 1
        chunk = request.chunk
        return Result(
            chunk=chunk,
            prompt=request.prompt,
            caption=f"fake caption of {chunk.item.id} part {chunk.index}",
            finish_reason="stop",
            prompt_tokens=800,
            output_tokens=12,
        )

    def run(self, feed: queue.Queue, sampling: Any, on_step: Any = None):
        from collections import deque

        held: deque = deque()
        held_s = 0.0
        while True:
            full = bool(held) and (len(held) >= self.hold_requests or held_s >= self.hold_audio_s)
            if not full:  # like VllmEngine.run: take more while under both caps
                try:
                    request = feed.get(timeout=0.02)
                except queue.Empty:
                    if on_step:
                        on_step()
                    if not held:
                        continue
                else:
                    if request is None:  # engine.END: finish what is held
                        while held:
                            yield self._answer(held.popleft(), on_step)
                        return
                    held.append(request)
                    held_s += request.chunk.end_s - request.chunk.start_s
                    self.max_held_s = max(self.max_held_s, held_s)
                    if on_step:
                        on_step()
                    continue
            done = held.popleft()  # one engine "step" finishes the oldest request
            held_s -= done.chunk.end_s - done.chunk.start_s
            yield self._answer(done, on_step)

    def abort_all(self) -> None:
        pass

    def close(self) -> None:
        pass


HOLD_HELP = "fake engine: 'engine' keeps requests in flight up to flamingo's engine caps; 'none' answers at once"


def engine_hold(kind: str) -> tuple[float, int]:
    """(audio seconds, requests) the fake engine keeps in flight: flamingo's EngineConfig defaults, or none."""
    if kind == "none":
        return (0.0, 0)
    from dataclasses import fields

    from flamingo_cli.engine import EngineConfig, in_flight_cap

    defaults = {f.name: f.default for f in fields(EngineConfig)}
    return (float(defaults["max_in_flight_audio_s"]), in_flight_cap(defaults["max_in_flight"], None))


def run_caption(
    args: list[str],
    progress_of: str = "items_seen",
    interval: float = 0.25,
    hold: tuple[float, int] = (0.0, 0),
    pace: float = 0.0,
) -> dict[str, Any]:
    """``flamingo caption ARGS`` in-process with the fake engine; RSS sampled against Stats."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import flamingo_cli.cli as cli
    import flamingo_cli.planner
    import flamingo_cli.prompts
    import flamingo_cli.sink  # imported up front: part of the baseline, not of the run
    import flamingo_cli.sources
    from flamingo_cli.env import Environment

    engine = InstantEngine(*hold, pace=pace)
    flamingo_cli.prompts.load_chat_template = lambda model: None
    made: list[Any] = []

    class Stats(flamingo_cli.planner.Stats):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    flamingo_cli.planner.Stats = Stats  # api imports it at call time

    def progress() -> int:
        return getattr(made[0], progress_of) if made else 0

    import gc

    gc.collect()
    baseline = rss_mb()
    peak_reset = reset_peak()
    sampler = Sampler(progress, interval)
    devnull = open(os.devnull, "w")  # noqa: SIM115  (a plain, non-TTY stream: log lines, no live panel)
    sampler.start()
    t0 = time.perf_counter()
    c0 = time.process_time()
    status = cli.main(["caption", *args], env=Environment(stdout=devnull, stderr=devnull, engine=engine))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    sampler.stop()
    devnull.close()
    s = made[0].snapshot() if made else {}
    return {
        "exit_status": int(status),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_mb() if peak_reset else max(r for _, _, r in sampler.samples), 1),
        "peak_source": "VmHWM" if peak_reset else "sampled",
        "end_rss_mb": round(rss_mb(), 1),
        "items_seen": s.get("items_seen"),
        "items_skipped": s.get("items_skipped"),
        "chunks_done": s.get("chunks_done"),
        "engine_results": engine.results,
        "engine_max_held_audio_s": round(engine.max_held_s, 1),
        "sampler": sampler,
    }


# --- subcommands -------------------------------------------------------------------------------------


def _decoders():
    import librosa

    from flamingo_cli.audio import decode
    from flamingo_cli.records import AudioItem

    def flamingo(path: str):
        return decode(AudioItem(id=path, path=path)).samples

    def librosa_load(path: str):
        return librosa.load(path, sr=16000, mono=True)[0]

    return {"flamingo": flamingo, "librosa": librosa_load}


def cmd_decode(a) -> list[dict[str, Any]]:
    """Each file with each decoder, single-threaded: one warm-up, then --repeat timed runs (median)."""
    import numpy as np

    files = decode_set(Path(a.dir), a.seconds)
    decoders = _decoders()
    wanted = a.decoder.split(",")
    results = []
    for path in files:
        import soundfile as sf

        info = sf.info(str(path))
        outs = {}
        for name in wanted:
            fn = decoders[name]
            outs[name] = fn(str(path))  # warm-up (page cache, lazy imports)
            cpu, wall = [], []
            for _ in range(a.repeat):
                w0, c0 = time.perf_counter(), time.process_time()
                fn(str(path))
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            audio_s = info.frames / info.samplerate
            c, w = statistics.median(cpu), statistics.median(wall)
            results.append(
                {
                    "mode": "decode",
                    "decoder": name,
                    "format": path.suffix.lstrip("."),
                    "sample_rate": info.samplerate,
                    "channels": info.channels,
                    "audio_s": round(audio_s, 2),
                    "cpu_s": round(c, 4),
                    "wall_s": round(w, 4),
                    "x_realtime_per_core": round(audio_s / c, 1),
                    "windows_per_s_per_core": round(audio_s / 30 / c, 2),
                    "file": path.name,
                }
            )
        if len(outs) == 2:
            x, y = outs["flamingo"], outs["librosa"]
            n = min(len(x), len(y))
            results[-1]["vs_flamingo"] = {
                "len_diff": int(len(y) - len(x)),
                "max_abs_diff": float(np.max(np.abs(x[:n] - y[:n]))),
            }
    for name in wanted:
        for fmt in DECODE_FORMATS:
            rows = [r for r in results if r["decoder"] == name and r["format"] == fmt]
            audio, cpu = sum(r["audio_s"] for r in rows), sum(r["cpu_s"] for r in rows)
            results.append(
                {
                    "mode": "decode_total",
                    "decoder": name,
                    "format": fmt,
                    "files": len(rows),
                    "audio_s": round(audio, 1),
                    "cpu_s": round(cpu, 3),
                    "x_realtime_per_core": round(audio / cpu, 1),
                    "windows_per_s_per_core": round(audio / 30 / cpu, 2),
                    "cores_for_h100": round(H100_WINDOWS_PER_S / (audio / 30 / cpu), 3),
                }
            )
    return results


def cmd_mix(a) -> list[dict[str, Any]]:
    """scripts/bench.py's file mix (20-30 s clips + 5-min tracks, MP3/FLAC): windows/s over a thread pool."""
    from concurrent.futures import ThreadPoolExecutor

    folder = mix_set(Path(a.dir), a.windows)
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix in (".mp3", ".flac"))
    decoders = _decoders()
    results = []
    for name in a.decoder.split(","):
        fn = decoders[name]
        for workers in a.workers:
            for p in paths[:8]:
                fn(p)  # warm-up
            with ThreadPoolExecutor(workers) as pool:
                w0, c0 = time.perf_counter(), time.process_time()
                lengths = list(pool.map(lambda p, fn=fn: len(fn(p)), paths))
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            audio_s = sum(lengths) / 16000
            # A request per file, windows as scripts/bench.py counts them (files here are < 600 s).
            windows = sum(math.ceil(round(n / 16000, 3) / 30) for n in lengths)
            results.append(
                {
                    "mode": "mix",
                    "decoder": name,
                    "workers": workers,
                    "files": len(paths),
                    "windows": windows,
                    "audio_s": round(audio_s, 1),
                    "wall_s": round(wall, 2),
                    "cpu_s": round(cpu, 2),
                    "windows_per_s": round(windows / wall, 1),
                    "windows_per_cpu_s": round(windows / cpu, 1),
                    "x_realtime_per_core": round(audio_s / cpu, 1),
                    "cores_for_h100": round(H100_WINDOWS_PER_S / (windows / cpu), 3),
                }
            )
    return results


def cmd_mel(a) -> list[dict[str, Any]]:
    """Whisper log-mel (128 bins) of 30 s windows, as vLLM's AF3/MF processor asks transformers for it."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    torch.set_num_threads(a.threads)
    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(30 * 16000).astype(np.float32) * 0.1 for _ in range(a.windows)]
    kw = dict(sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    fe(windows[:2], **kw)  # warm-up
    results = []
    for batch in (1, 10):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(windows), batch):
            fe(windows[i : i + batch], **kw)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        results.append(
            {
                "mode": "mel",
                "torch_threads": a.threads,
                "windows_per_call": batch,
                "windows": len(windows),
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "windows_per_cpu_s": round(len(windows) / cpu, 1),
                "windows_per_s": round(len(windows) / wall, 1),
                "cores_for_h100": round(H100_WINDOWS_PER_S / (len(windows) / cpu), 3),
                "torch": torch.__version__,
            }
        )
    return results


def cmd_manifest(a) -> dict[str, Any]:
    """A --rows manifest (distinct ids, paths round-robin over --tiny real files) through `flamingo caption`."""
    root = Path(a.dir)
    manifest = in_child(big_manifest, root, a.rows, a.tiny, a.format)
    out = root / f"out-manifest-{a.rows}-{a.format}"
    if not a.resume:
        shutil.rmtree(out, ignore_errors=True)
    elif not out.exists():
        raise SystemExit(f"{out}: no first run to resume; run without --resume first")
    args = [str(manifest), "--out", str(out), "--model", "af3", "--temperature", "0", "--max-tokens", "8"]
    args += ["--workers", str(a.workers), "--log-interval", "30"]
    if a.quiet:
        args.append("--quiet")
    r = run_caption(args, interval=a.interval, hold=engine_hold(a.hold))
    sampler = r.pop("sampler")
    marks = sorted({m for m in (100_000, 300_000, 1_000_000, a.rows) if m <= a.rows})
    r.update(
        {
            "mode": "manifest_resume" if a.resume else "manifest",
            "rows": a.rows,
            "format": a.format,
            "tiny_files": a.tiny,
            "workers": a.workers,
            "quiet": a.quiet,
            "engine_hold": a.hold,
            "items_per_s": round((r["items_seen"] or 0) / r["wall_s"], 1),
            "rss_mb_upto_items": {str(m): sampler.max_upto(m) for m in marks},
            "curve_t_items_rss": sampler.curve(),
            "parts": len(list(out.glob("run=*/part-*.parquet"))),
        }
    )
    return r


def cmd_long(a) -> dict[str, Any]:
    """A long track: decode() alone, or `flamingo caption` on --copies manifest rows of it."""
    root = Path(a.dir)
    track = in_child(long_track, root, a.hours, a.format, a.sample_rate, a.channels)
    base = {
        "mode": f"long_{a.what}",
        "track": track.name,
        "hours": a.hours,
        "file_mb": round(track.stat().st_size / 2**20),
    }
    if a.what == "decode":
        import gc

        decode = _decoders()[a.decoder]
        decode(str(in_child(write_audio, root / "warmup-1s.wav", 1.0, 44100, 2, 0)))  # lazy imports (librosa)
        gc.collect()
        baseline = rss_mb()
        ok = reset_peak()
        sampler = Sampler()
        sampler.start()
        w0, c0 = time.perf_counter(), time.process_time()
        samples = decode(str(track))
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        sampler.stop()
        peak = peak_mb() if ok else max(r for _, _, r in sampler.samples)
        result_mb = samples.nbytes / 2**20
        return {
            **base,
            "decoder": a.decoder,
            "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1),
            "peak_above_baseline_mb": round(peak - baseline, 1),
            "result_mb": round(result_mb, 1),
            "overhead_above_result_mb": round(peak - baseline - result_mb, 1),
            "peak_source": "VmHWM" if ok else "sampled",
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "x_realtime_per_core": round(a.hours * 3600 / cpu, 1),
        }
    manifest = root / f"long-{a.copies}x-{track.stem}.csv"
    with open(manifest, "w") as f:
        f.write("id,path\n")
        for i in range(a.copies):
            f.write(f"long{i:03d},{track.name}\n")
    out = root / f"out-long-{a.model}-{a.copies}"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(manifest), "--out", str(out), "--model", a.model, "--temperature", "0", "--max-tokens", "8"]
    args += ["--workers", str(a.workers), "--quiet"]
    r = run_caption(args, progress_of="chunks_done", interval=0.1, hold=engine_hold(a.hold), pace=a.pace)
    sampler = r.pop("sampler")
    result_mb = a.hours * 3600 * 16000 * 4 / 2**20
    return {
        **base,
        **r,
        "model": a.model,
        "copies": a.copies,
        "workers": a.workers,
        "engine_hold": a.hold,
        "engine_pace_windows_per_s": a.pace,
        "decoded_mb_per_copy": round(result_mb, 1),
        "peak_above_baseline_mb": round(r["peak_rss_mb"] - r["baseline_rss_mb"], 1),
        "curve_t_chunks_rss": sampler.curve(),
    }


def cmd_help(a) -> dict[str, Any]:
    """`flamingo --help` as a user runs it (the console script, a fresh interpreter each time)."""
    exe = shutil.which("flamingo") or str(Path(sys.executable).with_name("flamingo"))
    times = []
    for _ in range(a.runs + 1):
        t0 = time.perf_counter()
        subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    probe = (
        "import sys, flamingo_cli.cli as c; c.main(['--help']); "
        "print(sorted(m for m in ('torch','vllm','pyarrow','librosa','numpy','transformers') if m in sys.modules), "
        "file=sys.stderr)"
    )
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False).stderr
    return {
        "mode": "help",
        "command": f"{exe} --help",
        "first_run_s": round(times[0], 3),
        "runs_s": [round(t, 3) for t in times[1:]],
        "median_s": round(statistics.median(times[1:]), 3),
        "heavy_modules_imported": heavy.strip().splitlines()[-1] if heavy.strip() else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--dir", default="/tmp/bench-cpu", help="inputs are made (once) and outputs written here")
        p.add_argument("--results", default=None, help="append the JSON lines to this file")
        return p

    p = add("decode")
    p.add_argument("--seconds", type=float, default=180.0, help="length of each test file")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decoder", default="flamingo,librosa")
    p = add("mix")
    p.add_argument("--windows", type=int, default=300, help="size of scripts/bench.py's mix to decode")
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--decoder", default="flamingo,librosa")
    p = add("mel")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--windows", type=int, default=60)
    p = add("manifest")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--tiny", type=int, default=1000, help="real audio files the rows point at")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="pass --quiet (no input counter, no log lines)")
    p.add_argument("--resume", action="store_true", help="run again over the first run's output")
    p.add_argument("--interval", type=float, default=1.0, help="RSS sampling interval (s)")
    p.add_argument("--hold", choices=["engine", "none"], default="none", help=HOLD_HELP)
    p = add("long")
    p.add_argument("--what", choices=["decode", "pipeline"], default="decode")
    p.add_argument("--decoder", choices=["flamingo", "librosa"], default="flamingo", help="with --what decode")
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--format", choices=["flac", "mp3", "wav"], default="flac")
    p.add_argument("--sample-rate", type=int, default=44100)
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--model", choices=["af3", "mf"], default="af3")
    p.add_argument("--copies", type=int, default=1, help="manifest rows pointing at the track (distinct ids)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--hold", choices=["engine", "none"], default="engine", help=HOLD_HELP)
    p.add_argument("--pace", type=float, default=H100_WINDOWS_PER_S, help="fake engine windows/s (0: instant)")
    p = add("help")
    p.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    fn = {
        "decode": cmd_decode,
        "mix": cmd_mix,
        "mel": cmd_mel,
        "manifest": cmd_manifest,
        "long": cmd_long,
        "help": cmd_help,
    }[a.mode]
    res = fn(a)
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "versions": versions()}
    for r in res if isinstance(res, list) else [res]:
        line = json.dumps({**r, **stamp})
        print("RESULT " + line, flush=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
