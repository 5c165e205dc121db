"""The report's ``index.html``: the summary in plain HTML (readable without JavaScript: the same names
``flamingo inspect`` prints), the plots as inline SVG, and the rows table that ``browse.js`` fills."""

from __future__ import annotations

import json
from html import escape
from importlib.resources import files
from typing import Any


def _e(x: Any) -> str:
    return escape("" if x is None else str(x))


def _row(label: str, value: str, note: str = "", ident: str = "") -> str:
    v = f'<td class="num"{f" id={ident!r}" if ident else ""}>{value}</td>'
    return f'<tr><th scope="row">{_e(label)}</th>{v}<td class="dim">{_e(note)}</td></tr>'


def _summary(doc: dict[str, Any], meta: dict[str, Any]) -> str:
    errors = doc["chunk_errors"] + doc["item_errors"]
    superseded = f"{doc['rows_superseded']:,} superseded (retried or re-captioned)" if doc["rows_superseded"] else ""
    rows = [
        _row("rows", f"{doc['rows']:,}", superseded),
        _row(
            "current rows",
            f'<span id="row-count" data-rows="{meta["rows"]}">{meta["rows"]:,}</span>',
            "in the table below",
        ),
        _row("runs", str(doc["runs"])),
        _row("items", f"{doc['items']:,}", f"{doc['items_ok']:,} ok, {doc['items_with_errors']:,} with errors"),
        _row("chunks captioned", f"{doc['chunks_ok']:,}"),
        _row(
            "errors", f"{errors:,}", f"{doc['item_errors']:,} items unreadable, {doc['chunk_errors']:,} chunks failed"
        ),
        _row(
            "audio captioned",
            f"{doc['audio_hours_captioned']:,.3f} h",
            f"items total {doc['audio_hours_items']:,.3f} h",
        ),
        _row("tokens", f"{doc['prompt_tokens']:,} in", f"{doc['output_tokens']:,} generated"),
    ]
    return f'<table aria-label="summary"><tbody>{"".join(rows)}</tbody></table>'


def _errors(doc: dict[str, Any]) -> str:
    if not doc["errors_by_reason"]:
        return ""
    body = "".join(
        f'<tr><td class="num">{g["count"]:,}</td><td>{_e(g["reason"])}</td><td class="dim">{_e(g["example"])}</td></tr>'
        for g in doc["errors_by_reason"]
    )
    head = '<tr><th scope="col" class="num">count</th><th scope="col">reason</th><th scope="col">example</th></tr>'
    return f"<section><h2>errors by reason</h2><table><thead>{head}</thead><tbody>{body}</tbody></table></section>"


def _span(first: str | None, last: str | None) -> str:
    if not first or not last:
        return ""
    a, b = first[:16].replace("T", " "), last[:16].replace("T", " ")
    return f"{a} → {b[11:] if a[:10] == b[:10] else b} UTC"


def _runs(doc: dict[str, Any]) -> str:
    names = ["run", "model", "task", "rows", "items", "parts", "written"]
    head = "".join(f'<th scope="col"{" class=num" if n in ("rows", "items", "parts") else ""}>{n}</th>' for n in names)
    body, details = [], []
    for r in doc["run_details"]:
        body.append(
            f"<tr><td><a href='#run-{_e(r['run'])}'>{_e(r['run'])}</a></td>"
            f"<td>{_e(r.get('model'))}</td><td>{_e(r.get('task'))}</td>"
            f'<td class="num">{r.get("rows", 0):,}</td><td class="num">{r.get("items", 0):,}</td>'
            f'<td class="num">{r.get("parts", 0)}</td>'
            f"<td>{_e(_span(r.get('first_row_at'), r.get('last_row_at')))}</td></tr>"
        )
        settings = {
            k: r.get(k)
            for k in ("family", "prompt", "chunk_seconds", "overlap", "sampling", "schema", "extra_columns")
            if r.get(k) not in (None, [], {})
        }
        settings["flamingo_version"] = r.get("flamingo_version")
        if r.get("passed_over"):
            settings["passed_over (last scan)"] = r["passed_over"]
        items = "".join(
            f"<dt>{_e(k)}</dt><dd>{_e(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str))}"
            "</dd>"
            for k, v in settings.items()
        )
        details.append(
            f'<details id="run-{_e(r["run"])}"><summary>run {_e(r["run"])}: settings</summary>'
            f"<dl>{items}</dl></details>"
        )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f"<section><h2>runs</h2>{table}{''.join(details)}</section>"


def _filters(meta: dict[str, Any]) -> str:
    opts = [f'<option value="">all rows ({meta["rows"]:,})</option>']
    if len(meta["runs"]) > 1:
        opts += [
            f'<option value="run:{_e(r["run"])}">run {_e(r["run"])} ({r["rows"]:,})</option>' for r in meta["runs"]
        ]
    opts += [f'<option value="{f["id"]}">{_e(f["label"])} ({f["count"]:,})</option>' for f in meta["filters"]]
    return "".join(opts)


def render_index(doc: dict[str, Any], meta: dict[str, Any], plots: list[Any]) -> str:
    figures = "".join(
        f"<figure><figcaption>{_e(p.title)}</figcaption>{p.svg}<p class='dim'>{_e(p.summary)}</p></figure>"
        for p in plots
    )
    here = files("flamingo_cli.browse")
    js, css = (here.joinpath(name).read_text(encoding="utf-8") for name in ("browse.js", "style.css"))
    title = f"flamingo browse {doc['out']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><link rel="icon" href="data:,"><style>{css}</style></head>
<body>
<header><h1>{_e(title)}</h1>
<p class="dim">A static report of the current rows (the latest row per chunk, as <code>flamingo inspect</code> counts
them). It needs no server and no network; <code>flamingo browse --serve</code> serves it to another
machine.</p></header>
<main>
<div class="top">
<section aria-labelledby="summary-h"><h2 id="summary-h">summary</h2>{_summary(doc, meta)}</section>
{_runs(doc)}
{_errors(doc)}
</div>
<section aria-labelledby="plots-h"><h2 id="plots-h">plots</h2><div class="plots">{figures}</div></section>
<section aria-labelledby="rows-h"><h2 id="rows-h">rows</h2>
<noscript><p>The rows table needs JavaScript: it loads the rows page by page from <code>data/</code>.
Everything above does not.</p></noscript>
<form id="controls" role="search">
<label for="filter">show</label> <select id="filter">{_filters(meta)}</select>
<label for="q">search text</label> <input id="q" type="search" placeholder="caption, id, path, error…">
<button type="submit">search</button>
<button type="button" id="prev">previous</button> <span id="where" aria-live="polite"></span>
<button type="button" id="next">next</button>
</form>
<p id="status" role="status" aria-live="polite"></p><span id="view-count" hidden></span>
<div class="scroll"><table id="rows">
<caption class="dim">One row per chunk; a player plays exactly that chunk of the source.</caption>
<thead><tr id="head-row"></tr></thead><tbody id="rows-body"></tbody></table></div>
</section></main>
<script>window.flamingoMeta = (m) => {{ window.FLAMINGO_META = m; }};</script>
<script src="data/meta.js"></script>
<script>{js}</script>
</body></html>
"""
