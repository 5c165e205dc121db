"""``flamingo browse``: the offline HTML report of an output (report.py: the data pages; html.py and
browse.js: the page; plots.py: the SVG plots; serve.py: ``--serve``)."""

from __future__ import annotations

from typing import Any

__all__ = ["BrowseReport", "build_report", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("BrowseReport", "build_report"):
        from flamingo_cli.browse import report

        return getattr(report, name)
    if name == "serve":
        from flamingo_cli.browse.serve import serve

        return serve
    raise AttributeError(name)
