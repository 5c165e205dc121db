// flamingo browse: the rows table. Rows come from data/p/<n>.js (flamingoPage), filters' row numbers
// from data/f/<id>/<k>.js (flamingoIndex), both loaded with <script> tags so the report works from
// file:// (Chromium refuses fetch() there). No library, no network.
"use strict";
(function () {
  const M = window.FLAMINGO_META;
  const SHOW = 50; // rows on screen
  const KEEP = 200; // data pages kept in memory
  const pages = new Map(), indexes = new Map(), waiting = new Map();
  const col = Object.fromEntries(M.columns.map((c, i) => [c, i]));
  const $ = (id) => document.getElementById(id);
  const served = location.protocol === "http:" || location.protocol === "https:";

  window.flamingoPage = (n, rows) => { pages.set("p" + n, rows); };
  window.flamingoIndex = (id, k, rows) => { indexes.set(id + "/" + k, rows); };

  function load(key, src, store) {
    if (store.has(key)) return Promise.resolve(store.get(key));
    if (waiting.has(key)) return waiting.get(key);
    const p = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = () => { s.remove(); waiting.delete(key); resolve(store.get(key)); };
      s.onerror = () => { s.remove(); waiting.delete(key); reject(new Error("cannot load " + src)); };
      document.head.appendChild(s);
    });
    waiting.set(key, p);
    return p;
  }
  function page(n) {
    if (pages.size > KEEP) { for (const k of pages.keys()) { pages.delete(k); if (pages.size <= KEEP / 2) break; } }
    return load("p" + n, "data/p/" + n + ".js", pages);
  }
  function indexChunk(id, k) { return load(id + "/" + k, "data/f/" + id + "/" + k + ".js", indexes); }

  // A view: the rows a filter selects, as a length and row numbers by position.
  function view(choice) {
    if (choice.startsWith("run:")) {
      const r = M.runs.find((x) => x.run === choice.slice(4));
      return { label: "run " + r.run, length: r.rows, rows: async (a, b) => range(r.start + a, r.start + b) };
    }
    const f = M.filters.find((x) => x.id === choice);
    if (!f) return { label: "all rows", length: M.rows, rows: async (a, b) => range(a, b) };
    return {
      label: f.label, length: f.count,
      rows: async (a, b) => {
        const out = [];
        for (let k = Math.floor(a / M.index_rows); k * M.index_rows < b; k++) {
          const chunk = await indexChunk(f.id, k);
          for (let i = Math.max(a - k * M.index_rows, 0); i < chunk.length && k * M.index_rows + i < b; i++) out.push(chunk[i]);
        }
        return out;
      },
    };
  }
  function range(a, b) { const out = []; for (let i = a; i < b; i++) out.push(i); return out; }
  async function rowsAt(numbers) {
    const need = [...new Set(numbers.map((n) => Math.floor(n / M.page_rows)))];
    await Promise.all(need.map(page));
    return Promise.all(numbers.map(async (n) => [n, (await page(Math.floor(n / M.page_rows)))[n % M.page_rows]]));
  }

  // --- drawing ------------------------------------------------------------------------------------
  const fmt = (x) => (x == null ? "" : typeof x === "number" ? (Number.isInteger(x) ? x.toLocaleString("en") : x.toFixed(2)) : typeof x === "object" ? JSON.stringify(x) : String(x));
  const shown = new Set(["run", "id", "path", "chunk_index", "num_chunks", "start_s", "end_s", "caption", "reasoning", "error", "flags"]);
  const others = M.columns.filter((c) => !shown.has(c));
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) { if (v != null) e.setAttribute(k, v); }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }
  function audioUrl(path) {
    const enc = path.split("/").map(encodeURIComponent).join("/");
    return (served ? "/_audio" : "file://") + enc;
  }
  function player(r) {
    const path = r[col.path], s = r[col.start_s], e = r[col.end_s];
    if (!path) return "";
    if (/^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(path)) {
      const span = s == null ? "" : " (" + s.toFixed(1) + "–" + e.toFixed(1) + " s)";
      return el("span", { class: "remote" }, "object-store source, not playable here" + span + ": ", el("a", { href: path }, path));
    }
    if (s == null || e == null) return el("span", { class: "dim" }, "no audio (nothing decoded)");
    if (!path.startsWith("/")) return el("span", { class: "dim" }, "relative path, not playable here");
    const a = el("audio", { controls: "", preload: "none", src: audioUrl(path) + "#t=" + s + "," + e, "data-start": s, "data-end": e,
      "aria-label": "play " + r[col.id] + " from " + s.toFixed(1) + " to " + e.toFixed(1) + " s" });
    return a;
  }
  function cell(...kids) { return el("td", {}, ...kids); }
  function drawRow(n, r) {
    const tr = el("tr", { "data-row": n });
    if (M.runs.length > 1) tr.append(cell(r[col.run]));
    tr.append(cell(el("span", { class: "id" }, fmt(r[col.id])), el("br"), el("span", { class: "dim path" }, fmt(r[col.path]))));
    const ci = r[col.chunk_index], nc = r[col.num_chunks];
    const where = ci === -1 ? "track" : nc ? (ci + 1) + "/" + nc : "–"; // -1: a track row (records.TRACK_INDEX)
    const span = r[col.start_s] == null ? "" : r[col.start_s].toFixed(1) + "–" + r[col.end_s].toFixed(1) + " s";
    tr.append(cell(where, el("br"), el("span", { class: "dim" }, span)));
    tr.append(cell(player(r)));
    const cap = cell(el("div", { class: "caption" }, fmt(r[col.caption])));
    if (col.reasoning != null && r[col.reasoning]) cap.append(el("details", {}, el("summary", {}, "reasoning"), el("div", { class: "reasoning" }, r[col.reasoning])));
    tr.append(cap);
    tr.append(el("td", { class: r[col.error] ? "error" : "" }, fmt(r[col.error])));
    if (col.flags != null) tr.append(cell(...(r[col.flags] || []).map((f) => el("span", { class: "flag" }, f))));
    for (const c of others) tr.append(cell(fmt(r[col[c]])));
    return tr;
  }
  function header() {
    const tr = $("head-row");
    const names = [...(M.runs.length > 1 ? ["run"] : []), "id / path", "chunk", "listen", "caption", "error", ...(col.flags != null ? ["flags"] : []), ...others];
    tr.replaceChildren(...names.map((n) => el("th", { scope: "col" }, n)));
  }

  // --- state --------------------------------------------------------------------------------------
  let current = view(""), at = 0, search = null, token = 0;
  async function show() {
    const my = ++token;
    if (search) {
      // Matches are drawn as the scan finds them; it stops once the screen is full (or at the end).
      let drawn = -1;
      while (true) {
        const done = search.found.length >= at + SHOW || search.pos >= current.length;
        const visible = search.found.slice(at, at + SHOW);
        if (visible.length !== drawn || done) await draw(visible, search.found.length, my, done);
        else status(done);
        drawn = visible.length;
        if (my !== token || done) return;
        await scan(search, my);
      }
    }
    const numbers = await current.rows(at, Math.min(at + SHOW, current.length));
    await draw(numbers, current.length, my, true);
  }
  async function draw(numbers, total, my, done) {
    const rows = await rowsAt(numbers);
    if (my !== token) return;
    $("rows-body").replaceChildren(...rows.map(([n, r]) => drawRow(n, r)));
    const n = (x) => x.toLocaleString("en");
    const last = at + numbers.length;
    $("where").textContent = numbers.length ? "rows " + n(at + 1) + "–" + n(last) + " of " + (search && !done ? "at least " : "") + n(total) : "no rows";
    $("view-count").textContent = total;
    status(done);
    $("prev").disabled = at === 0;
    $("next").disabled = search ? search.pos >= current.length && last >= total : last >= total;
    if (done) window.flamingoReady = true;
  }
  function status(done) {
    const n = (x) => x.toLocaleString("en");
    if (!search) { $("status").textContent = current.label + ": " + n(current.length) + " rows"; return; }
    const end = search.pos >= current.length;
    const where = end ? "" : " (searched " + n(search.pos) + " of " + n(current.length) + " rows" + (done ? "; next searches on)" : "…)");
    $("status").textContent = (end ? "" : "at least ") + n(search.found.length) + " matches for “" + search.q + "” in " + current.label + where;
  }
  // Text search scans the current view's rows a few data pages at a time (every match in them is kept).
  async function scan(s, my) {
    const step = 16 * M.page_rows;
    const end = Math.min(s.pos + step, current.length);
    const rows = await rowsAt(await current.rows(s.pos, end));
    if (my !== token) return;
    for (const [n, r] of rows) if (text(r).includes(s.q)) s.found.push(n);
    s.pos = end;
  }
  // Search looks at the text columns (not numbers or times).
  const textual = (c) => /string/.test(M.kinds[c] || "") && c !== "created_at";
  const searchable = ["id", "path", "caption", "reasoning", "error", "flags", ...others.filter(textual)].filter((c) => col[c] != null).map((c) => col[c]);
  function text(r) {
    let t = "";
    for (const i of searchable) { const v = r[i]; if (v != null) t += (typeof v === "string" ? v : JSON.stringify(v)) + "\n"; }
    return t.toLowerCase();
  }

  function fail(e) { $("status").textContent = String(e); console.error(e); }
  function choose() {
    current = view($("filter").value);
    const q = $("q").value.trim().toLowerCase();
    search = q ? { q, pos: 0, found: [] } : null;
    at = 0;
    show().catch(fail);
  }
  $("filter").addEventListener("change", choose);
  $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); choose(); });
  $("prev").addEventListener("click", () => { at = Math.max(0, at - SHOW); show().catch(fail); });
  $("next").addEventListener("click", () => { at += SHOW; show().catch(fail); });
  // A player plays its chunk only: from the chunk's start, paused at its end.
  document.addEventListener("play", (ev) => {
    const a = ev.target, s = +a.dataset.start, e = +a.dataset.end;
    if (a.tagName === "AUDIO" && (a.currentTime < s - 0.05 || a.currentTime >= e)) a.currentTime = s;
  }, true);
  document.addEventListener("timeupdate", (ev) => {
    const a = ev.target;
    if (a.tagName === "AUDIO" && a.currentTime >= +a.dataset.end) { a.pause(); a.currentTime = +a.dataset.start; }
  }, true);
  // For scripts and tests: choose a view, search, or go to a row position of the view.
  window.flamingoBrowse = {
    view: (v) => { $("filter").value = v; choose(); },
    search: (q) => { $("q").value = q; choose(); },
    go: (i) => { at = Math.max(0, Math.min(i, Math.max(current.length - 1, 0))); show().catch(fail); },
  };
  header();
  show().catch(fail);
})();
