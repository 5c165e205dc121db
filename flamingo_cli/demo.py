"""``flamingo demo``: a smoke test on any machine, through the Python API like any user.

Builds a tiny RANDOM-WEIGHT checkpoint and a few sample tracks (one longer than ``--chunk-seconds``, an
AAC one FFmpeg decodes), captions them with ``flamingo_cli.caption``, prints the rows, then runs the
same call again to show that resume finds nothing to do. The captions are gibberish by design.
"""

from __future__ import annotations

from pathlib import Path

from flamingo_cli.env import Environment, ExitStatus

DEMO_CHUNK_S = 15.0  # the demo's --chunk-seconds: its 40-s track becomes three chunks
DEMO_LONG_S = 40
REAL_MODELS = "Real models on a GPU host: flamingo caption DIR --out OUT --model nvidia/audio-flamingo-3-hf"


def _sample_audio(audio_dir: Path) -> None:
    """The demo's tracks (made once): rates, channels and codecs a real corpus mixes."""
    import numpy as np
    import soundfile as sf

    from flamingo_cli.audio import FFMPEG_ENCODINGS, write_ffmpeg

    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, sr, seconds, channels in (
        ("tone-44k-stereo.flac", 44100, 12, 2),
        ("noise-16k.wav", 16000, DEMO_LONG_S, 1),  # longer than --chunk-seconds: captioned in chunks
        ("chirp-22k.ogg", 22050, 7, 1),
        ("voice-memo.m4a", 44100, 5, 2),  # AAC: decoded by FFmpeg (bundled in PyAV), no system ffmpeg
    ):
        path = audio_dir / name
        if path.exists():
            continue
        if path.suffix in FFMPEG_ENCODINGS:
            sr, channels = FFMPEG_ENCODINGS[path.suffix][2:]
        t = np.arange(int(sr * seconds)) / sr
        x = 0.3 * np.sin(2 * np.pi * (220 + 40 * t) * t) + 0.05 * rng.standard_normal(t.size)
        if path.suffix in FFMPEG_ENCODINGS:
            write_ffmpeg(path, np.repeat(x[None, :].astype(np.float32), channels, axis=0))
        else:
            sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr)


def _print(env: Environment, lines: list[str]) -> None:
    """Lines meant to be copied: written as they are (no Rich wrapping, no markup)."""
    env.stdout.write("".join(line + "\n" for line in lines))
    env.stdout.flush()


def run_demo(workdir: Path, kind: str = "af3", env: Environment | None = None) -> int:
    """Caption the sample tracks twice (the second run resumes: nothing to do); the exit status."""
    import flamingo_cli
    from flamingo_cli.checkpoints import build_checkpoint

    env = env or Environment()
    ckpt = workdir / f"tiny-{kind}"
    if not (ckpt / "config.json").exists():
        env.info(f"building a tiny random-weight {kind} checkpoint in {ckpt} …")
        build_checkpoint(kind, ckpt)
    audio_dir = workdir / "audio"
    _sample_audio(audio_dir)
    out = workdir / "out"
    env.info("NOTE: the demo model has RANDOM weights; its captions are meaningless smoke-test text.")
    options = {
        "model": str(ckpt),
        "temperature": 0,
        "max_tokens": 16,
        "chunk_seconds": DEMO_CHUNK_S,
        "task": "caption" if kind == "af3" else "describe-music",
    }
    first = flamingo_cli.caption(
        [str(audio_dir)], str(out), env=env, summary_json=str(workdir / "first-run.json"), **options
    )
    if first.status != ExitStatus.OK:
        return int(first.status)
    table = flamingo_cli.read_output(out)  # the current rows, sorted by run, id, chunk
    rows = table.to_pylist()
    lines = [f"{table.num_rows} rows in {out} (random-model captions):"]
    lines += [f"  {row['id']} [{row['start_s']:.0f}–{row['end_s']:.0f} s]: {row['caption']!r}" for row in rows]
    chunked = {r["id"] for r in rows if r["chunk_index"] > 0}
    lines.append(f"chunked (--chunk-seconds {DEMO_CHUNK_S}): {', '.join(sorted(chunked)) or 'none'}")
    _print(env, lines)

    # The same call again, as a cron job would: everything is already in out, nothing is redone.
    env.info("running the same command again (resume) …")
    second = flamingo_cli.caption(
        [str(audio_dir)], str(out), env=env, summary_json=str(workdir / "second-run.json"), **options
    )
    if second.status != ExitStatus.OK:
        return int(second.status)
    doc = second.summary
    rows_after = flamingo_cli.read_output(out, current=False).num_rows
    files = len({r["id"] for r in rows})
    resumed = not doc.get("rows_written") and rows_after == table.num_rows
    how = doc.get("reason") or f"{doc.get('files_skipped')} of {doc.get('files_seen')} files already done"
    verdict = "resume works" if resumed else "UNEXPECTED: work was redone"
    _print(
        env,
        [
            f"second run: {how} ({files} files, {rows_after} rows already in {out}; "
            f"{doc.get('rows_written') or 0} new rows): {verdict}",
            REAL_MODELS,
        ],
    )
    return int(ExitStatus.OK if resumed else ExitStatus.ITEMS_FAILED)
