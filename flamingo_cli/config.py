"""Task presets (configs/*.toml): a model, a prompt and sampling defaults, chosen by name or path.

Precedence, lowest to highest: the checkpoint's generation_config.json, the preset's [sampling], then
command-line flags. The presets ship inside the package (flamingo_cli/configs) and in the repo's
configs/ folder during development.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo_cli.errors import UsageError

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "ignore_eos")


class ConfigError(UsageError):
    """A preset that cannot be found or read; the message names it and the reason."""


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    prompt: str
    description: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def preset_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [d for d in (here / "configs", here.parent / "configs") if d.is_dir()]


def _parse(path: Path) -> Preset:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read preset ({exc})") from exc
    task = data.get("task", {})
    missing = [k for k in ("model", "prompt") if not task.get(k)]
    if missing:
        raise ConfigError(f"{path}: [task] lacks {', '.join(missing)}")
    sampling = dict(data.get("sampling", {}))
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown [sampling] keys {sorted(unknown)}; known: {list(SAMPLING_KEYS)}")
    return Preset(
        name=task.get("name", path.stem),
        model=task["model"],
        prompt=task["prompt"],
        description=task.get("description", ""),
        sampling=sampling,
        source=str(path),
    )


def list_presets() -> list[Preset]:
    seen: dict[str, Preset] = {}
    for d in preset_dirs():
        for path in sorted(d.glob("*.toml")):
            preset = _parse(path)
            seen.setdefault(preset.name, preset)
    return list(seen.values())


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (caption, describe-music, ...) or by path to a TOML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: preset file not found")
        return _parse(path)
    for preset in list_presets():
        if preset.name == name_or_path:
            return preset
    names = ", ".join(p.name for p in list_presets())
    raise ConfigError(f"unknown task preset {name_or_path!r}; known: {names}")
