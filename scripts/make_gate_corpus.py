"""A corpus for issue 25's GPU measure: normal clips, silent ones, and duplicates under other names.

    python scripts/make_gate_corpus.py --out DIR --count 600 --seconds 10 [--silence 0.3 --dup 0.1]

Of ``count`` files: ``silence`` are silent (half digital zeros, half near-silence: white noise at about
-70 dBFS), ``dup`` are duplicates of normal files (half the same bytes under another name, half a FLAC
of a WAV original: the same PCM in another container), the rest normal clips (a tone and noise, each its
own frequency, WAV or FLAC 16-bit at 16/44.1/48 kHz). Prints one JSON line with the counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=600)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--silence", type=float, default=0.3)
    p.add_argument("--dup", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    n_sil = round(a.count * a.silence)
    n_dup = round(a.count * a.dup)
    n_norm = a.count - n_sil - n_dup
    rates = [16000, 44100, 48000]
    originals: list[tuple[Path, int, np.ndarray]] = []
    for i in range(n_norm):
        sr = rates[i % len(rates)]
        t = np.arange(int(a.seconds * sr)) / sr
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) + 0.05 * rng.standard_normal(t.size)
        path = out / f"clip{i:05d}.{'wav' if i % 2 == 0 else 'flac'}"
        sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
        originals.append((path, sr, x))
    for i in range(n_sil):
        sr = rates[i % len(rates)]
        n = int(a.seconds * sr)
        x = np.zeros(n, np.float32) if i % 2 == 0 else (10 ** (-70 / 20) * rng.standard_normal(n)).astype(np.float32)
        sf.write(out / f"quiet{i:05d}.wav", x, sr, subtype="PCM_16")
    wavs = [o for o in originals if o[0].suffix == ".wav"]
    for i in range(n_dup):
        src, sr, _ = originals[(i * 7) % len(originals)] if i % 2 == 0 else wavs[(i * 5) % len(wavs)]
        if i % 2 == 0:  # the same bytes under another name
            shutil.copyfile(src, out / f"copy{i:05d}{src.suffix}")
        else:  # the same 16-bit PCM in another container
            data, rate = sf.read(src, dtype="int16")
            sf.write(out / f"copy{i:05d}.flac", data, rate, subtype="PCM_16")
    print(json.dumps({"mode": "gate-corpus", "files": a.count, "normal": n_norm, "silent": n_sil, "duplicates": n_dup}))


if __name__ == "__main__":
    main()
