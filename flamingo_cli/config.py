"""Task presets (configs/*.toml): a model, a prompt and sampling defaults, chosen by name or path.

Precedence, lowest to highest: the checkpoint's generation_config.json, the preset's [sampling], then
command-line flags. The presets ship inside the package (flamingo_cli/configs) and in the repo's
configs/ folder during development.

A preset may carry a JSON Schema for structured captions: ``schema`` in ``[task]``, either an inline
table or a path to a ``.json`` file relative to the preset. Here it is only read; flamingo_cli/schema.py
checks it when a run uses it (so listing presets never imports vLLM).
"""

from __future__ import annotations

import json
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
    schema: dict[str, Any] | None = None  # a JSON Schema (structured captions), parsed but not yet checked
    schema_source: str = ""  # where it came from, for error messages: the .json file or the preset's table
    # The instruction of an item's track row (issue 26): one caption of the whole from its chunks' captions.
    track_prompt: str = ""


DEFAULT_TRACK_PROMPT = (
    "Write one detailed caption of the whole recording from these descriptions of its parts: what it is, "
    "what happens and how it changes over time."
)


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
    schema, schema_source = _schema(path, task.get("schema"))
    return Preset(
        name=task.get("name", path.stem),
        model=task["model"],
        prompt=task["prompt"],
        description=task.get("description", ""),
        sampling=sampling,
        source=str(path),
        schema=schema,
        schema_source=schema_source,
        track_prompt=str(task.get("track_prompt") or DEFAULT_TRACK_PROMPT),
    )


def _schema(preset: Path, value: Any) -> tuple[dict[str, Any] | None, str]:
    """[task] schema: an inline table, or a JSON file named relative to the preset."""
    if value is None:
        return None, ""
    if isinstance(value, dict):
        return value, f"{preset} [task.schema]"
    if not isinstance(value, str):
        raise ConfigError(f"{preset}: [task] schema must be a table or a path to a .json file")
    file = (preset.parent / value).expanduser()
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{preset}: cannot read its schema {file} ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{preset}: its schema {file} is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{preset}: its schema {file} is not a JSON object")
    return doc, str(file)


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
