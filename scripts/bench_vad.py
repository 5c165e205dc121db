"""What the gates cost on the CPU, per hour of audio: the cheap measures (level, activity, sha256) and
Silero VAD (--vad), on generated 16 kHz audio cut into 30 s chunks as flamingo cuts it.

    python scripts/bench_vad.py [--minutes 5] [--threads 1] [--chunk-seconds 30]

Prints one JSON line: CPU seconds per audio hour for each, the real-time factors, and where it ran.
The audio is a mix of speech-like signal (tests/audiogen.py's recipe), noise and silence, so the VAD
sees both kinds of frames; its cost hardly depends on the content (it runs every 32 ms window).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from flamingo_cli.gates import Vad, measure

SR = 16000


def _audio(seconds: float) -> np.ndarray:
    from audiogen import speech_like

    rng = np.random.default_rng(0)
    parts, total = [], 0
    while total < seconds * SR:
        kind = total // (10 * SR) % 3
        if kind == 0:
            part = speech_like(10.0)
        elif kind == 1:
            part = (0.05 * rng.standard_normal(10 * SR)).astype(np.float32)
        else:
            part = np.zeros(10 * SR, np.float32)
        parts.append(part)
        total += len(part)
    return np.concatenate(parts)[: round(seconds * SR)]


def _cpu(fn, chunks) -> float:
    start = time.process_time()
    for c in chunks:
        fn(c)
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the VAD (flamingo's decode pool "
                    "runs one VAD per worker thread)")  # fmt: skip
    ap.add_argument("--chunk-seconds", type=float, default=30.0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    seconds = args.minutes * 60
    audio = _audio(seconds)
    step = round(args.chunk_seconds * SR)
    chunks = [audio[i : i + step] for i in range(0, len(audio), step)]
    vad = Vad()
    vad.speech(chunks[0])  # load the model (once per thread in a run) outside the timing
    measures_s = _cpu(measure, chunks)
    vad_s = _cpu(vad.speech, chunks)
    hours = seconds / 3600
    print(
        json.dumps(
            {
                "bench": "gates_cpu",
                "date": datetime.now(UTC).date().isoformat(),
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": args.threads,
                "audio_minutes": args.minutes,
                "chunk_seconds": args.chunk_seconds,
                "measures_cpu_s_per_audio_hour": round(measures_s / hours, 2),
                "vad_cpu_s_per_audio_hour": round(vad_s / hours, 1),
                "measures_x_realtime": round(seconds / max(measures_s, 1e-9)),
                "vad_x_realtime": round(seconds / max(vad_s, 1e-9)),
            }
        )
    )


if __name__ == "__main__":
    main()
