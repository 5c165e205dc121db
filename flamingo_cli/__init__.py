"""flamingo: bulk audio captioning with the Audio Flamingo family (AF3, Music Flamingo, AF-Next) via vLLM.

The Python API mirrors the CLI (``flamingo caption`` / ``flamingo describe-music``)::

    import flamingo_cli
    report = flamingo_cli.caption(["/data/audio"], "/data/captions", model="af3", temperature=0)
    doc = flamingo_cli.describe("song.flac")
    table = flamingo_cli.read_output("/data/captions")  # the current rows, `run` as a column
    flamingo_cli.export("/data/captions", "current.parquet")  # the same, as one file any reader takes
    flamingo_cli.build_report("/data/captions")  # flamingo browse: the offline HTML report

Imported lazily, so ``import flamingo_cli`` (and ``flamingo --help``) loads neither torch nor vLLM.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "CaptionReport",
    "CaptionSpec",
    "SpecError",
    "__version__",
    "build_report",
    "caption",
    "describe",
    "export",
    "read_output",
]

_LAZY = {
    "caption": "flamingo_cli.api",
    "describe": "flamingo_cli.api",
    "CaptionReport": "flamingo_cli.api",
    "CaptionSpec": "flamingo_cli.spec",
    "SpecError": "flamingo_cli.spec",
    "export": "flamingo_cli.output.export",
    "read_output": "flamingo_cli.output.layout",
    "build_report": "flamingo_cli.browse.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flamingo_cli' has no attribute {name!r}")
