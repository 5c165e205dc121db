"""Audio-dataset formats as inputs: HF ``datasets``, WebDataset tar shards, lhotse manifests.

Each yields the same AudioItems as a folder or manifest, lazily and in a stable order, with stable ids:

* HF datasets (``save_to_disk`` folder, ``hf:<Parquet/Arrow folder or file>``, ``hf:<hub id>[#split]``,
  or a Parquet file whose audio column holds embedded bytes): the Audio column is cast to
  ``Audio(decode=False)`` so ``datasets`` never decodes; the bytes (or the path) go to flamingo's own
  decoder. id = the ``id`` column, else ``<split>/<row index>``. Other columns pass through.
* WebDataset shards (``.tar``, ``.tar.gz``/``.tgz``; local or any fsspec URL), read as a stream with
  the standard library's tarfile: one item per audio member, id = the member name; the sample's
  ``.json`` (its keys), ``.txt`` and ``.cls`` sidecars pass through.
* lhotse cuts/recordings manifests (``.jsonl``/``.jsonl.gz``), parsed from lhotse's documented JSON
  (no lhotse import: it pulls in torch): a cut's recording source + start/duration become a segment,
  id = the cut id. Relative source paths resolve against the manifest's folder (or URL).

Dataset rows and lhotse cuts become items through manifests.row_item, so ids, offset/duration, prompts
and passthrough columns follow the manifest rules. A bad row/member becomes an AudioItem with ``error``
set; only usage errors raise ``SourceError``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

from flamingo_cli import remote
from flamingo_cli.manifests import row_item
from flamingo_cli.records import AudioItem, SeenIds

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SIDECARS = ("json", "txt", "cls")
HF_PREFIX = "hf:"


class CorpusError(Exception):
    """A dataset input cannot be used as a whole (sources wraps it as a SourceError)."""


def _open(path: str) -> IO[bytes]:
    return remote.open_binary(path) if remote.is_url(path) else open(path, "rb")


# --- WebDataset ------------------------------------------------------------------------------------------


def is_tar(path: str) -> bool:
    return (
        remote.basename(path).lower().endswith(TAR_SUFFIXES)
        if remote.is_url(path)
        else path.lower().endswith(TAR_SUFFIXES)
    )


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member path up to the first "." of its file name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _sidecars(found: Mapping[str, bytes]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for ext in _SIDECARS:
        raw = found.get(ext)
        if raw is None:
            continue
        text = raw.decode("utf-8", errors="replace")
        if ext == "json":
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                extra.update(obj)
            else:
                extra["json"] = text
        elif ext == "cls":
            extra["cls"] = int(text.strip()) if text.strip().lstrip("-").isdigit() else text.strip()
        else:
            extra["txt"] = text
    return extra


def iter_webdataset(shown: str, path: str, exts: tuple[str, ...], with_data: bool = True) -> Iterator[AudioItem]:
    """One pass over the shard (no index, no seeks: works on any stream); a sample's members are
    consecutive, so one sample's bytes at a time are held. ``with_data=False`` skips the audio bytes
    (ids and sidecars only: for counting)."""
    audio_exts = {e.lstrip(".") for e in exts}
    shard = path if remote.is_url(path) else os.path.abspath(path)
    key: str | None = None
    group: dict[str, bytes] = {}
    names: dict[str, str] = {}

    def flush() -> Iterator[AudioItem]:
        extra = _sidecars(group)
        for ext in sorted(names):
            member = names[ext]
            yield AudioItem(
                id=member,
                path=f"tar://{member}::{shard}",
                origin=f"{shown}:{member}",
                extra=extra,
                data=group[ext] if with_data else None,
            )

    try:
        with _open(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for member in tf:
                if not member.isfile() or posixpath.basename(member.name).startswith("."):
                    continue
                k, ext = _split_key(member.name)
                if k != key:
                    if key is not None:
                        yield from flush()
                    key, group, names = k, {}, {}
                wanted = ext in audio_exts or ext.rsplit(".", 1)[-1] in audio_exts
                if not wanted and ext not in _SIDECARS:
                    continue
                f = tf.extractfile(member) if with_data or not wanted else None
                group[ext] = f.read() if f is not None else b""
                if wanted:
                    names[ext] = member.name
            if key is not None:
                yield from flush()
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        # Members after a corrupt block cannot be reached; say so as a counted error row.
        where = f" after {key!r}" if key is not None else ""
        yield AudioItem(
            id=f"{remote.basename(shard)}:unreadable",
            path=shard if not remote.is_url(shard) else remote.redact(shard),
            origin=shown,
            error=f"cannot read tar shard{where} ({remote.redact(str(e)) or type(e).__name__}): {shown}",
        )


def probe_webdataset(shown: str, path: str) -> None:
    try:
        with _open(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            tf.next()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as e:
        raise CorpusError(f"{shown}: not a tar shard ({e})") from e


# --- lhotse ------------------------------------------------------------------------------------------------


def is_lhotse_row(obj: Any) -> bool:
    """A lhotse cut (has a recording or names a *Cut type) or recording (sources + sampling_rate)."""
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type")
    return (
        isinstance(obj.get("recording"), dict)
        or (isinstance(kind, str) and kind.endswith("Cut"))
        or ("sources" in obj and "sampling_rate" in obj)
    )


def open_text(path: str) -> IO[str]:
    """Text lines of a local or remote file, gunzipped when the name ends in .gz."""
    raw = _open(path)
    stream: IO[bytes] = gzip.GzipFile(fileobj=raw) if path.split("?", 1)[0].endswith(".gz") else raw
    import io

    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape")
    if stream is not raw:
        close = text.close

        def close_both() -> None:
            close()
            raw.close()

        text.close = close_both  # type: ignore[method-assign]
    return text


def first_object(path: str, max_lines: int = 1000) -> Any:
    """The first JSON object of a JSON-lines file (None when there is none in the first lines)."""
    with contextlib.closing(open_text(path)) as f:
        for _, line in zip(range(max_lines), f, strict=False):
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def _resolve(base: str, source: str) -> str:
    if remote.is_url(source) or os.path.isabs(source):
        return source
    return remote.join(base + "/", source) if remote.is_url(base) else os.path.abspath(os.path.join(base, source))


def _lhotse_item(obj: dict[str, Any], base: str, origin: str, placeholder: str) -> AudioItem:
    """A cut (a segment of its recording) or a recording (the whole file), through the manifest row's
    function: its id, start/duration as offset/duration, the recording id, supervision text and custom
    fields as passthrough columns."""

    def bad(reason: str) -> AudioItem:
        return row_item({"id": obj.get("id")}, "", origin, placeholder, error=reason)

    rec = obj["recording"] if isinstance(obj.get("recording"), dict) else obj if "sources" in obj else None
    if rec is None:
        return bad(f"unsupported lhotse cut type {obj.get('type')!r} (only cuts with one recording)")
    if rec.get("transforms"):
        return bad("lhotse recording transforms (speed/volume/…) are not supported")
    sources = rec.get("sources") or []
    channel = obj.get("channel")
    chosen = next(
        (s for s in sources if isinstance(channel, int) and channel in (s.get("channels") or [])),
        sources[0] if sources else None,
    )
    if not isinstance(chosen, dict):
        return bad("recording has no sources")
    kind, src = chosen.get("type"), chosen.get("source")
    if kind not in ("file", "url") or not isinstance(src, str):
        return bad(f"unsupported lhotse audio source type {kind!r} (file and url are read)")
    is_cut = rec is not obj
    row: dict[str, Any] = {
        "id": obj.get("id"),
        "offset": obj.get("start") if is_cut else None,
        "duration": obj.get("duration") if is_cut else None,
        "prompt": None,
        "recording_id": rec.get("id"),
    }
    texts = [s.get("text") for s in obj.get("supervisions") or [] if isinstance(s, dict) and s.get("text")]
    if texts:
        row["text"] = " ".join(texts)
    custom = obj.get("custom")
    if isinstance(custom, dict):  # custom fields never override the cut's own (nor set id/offset/…/prompt)
        row.update({k: v for k, v in custom.items() if k not in row})
    return row_item(row, _resolve(base, src), origin, placeholder)


def iter_lhotse(shown: str, path: str) -> Iterator[AudioItem]:
    base = remote.parent(path) if remote.is_url(path) else os.path.dirname(os.path.abspath(path))
    name = remote.basename(path)
    seen = SeenIds("row ")
    with contextlib.closing(open_text(path)) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin, placeholder = f"{shown}:{n}", f"{name}:row{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield AudioItem(id=placeholder, path="", origin=origin, error=f"invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                yield AudioItem(id=placeholder, path="", origin=origin, error="not a JSON object")
                continue
            item = _lhotse_item(obj, base, origin, placeholder)
            checked = seen.check(item, n)  # an error row keeps its own reason (its id still counts)
            yield item if item.error is not None else checked


# --- HF datasets -------------------------------------------------------------------------------------------


def is_saved_dataset(path: str) -> bool:
    """A ``save_to_disk`` folder (a Dataset: state.json; a DatasetDict: dataset_dict.json)."""
    for marker in ("state.json", "dataset_dict.json"):
        target = remote.join(path.rstrip("/") + "/", marker) if remote.is_url(path) else os.path.join(path, marker)
        try:
            if remote.is_url(target):
                if remote.exists(target)[0]:
                    return True
            elif os.path.isfile(target):
                return True
        except OSError:
            return False
    return False


def _hf_target(spec: str) -> tuple[str, str | None]:
    target = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) and not spec.startswith("hf://") else spec
    split = None
    if "#" in target:
        target, split = target.rsplit("#", 1)
    return (target if remote.is_url(target) else os.path.expanduser(target)), (split or None)


def _data_files(target: str) -> tuple[str, str] | None:
    """("parquet"|"arrow", data_dir-or-file) when target is a local/remote Parquet/Arrow file or folder."""
    low = target.lower()
    for builder in ("parquet", "arrow"):
        if low.endswith("." + builder):
            return builder, target
    try:
        if remote.is_url(target):
            files = [rel for rel, _ in remote.walk_files(target)]
        elif os.path.isdir(target):
            files = [os.path.relpath(os.path.join(d, f), target) for d, _, fs in os.walk(target) for f in fs]
        else:
            return None
    except (OSError, FileNotFoundError):
        return None
    for builder in ("parquet", "arrow"):
        if any(f.lower().endswith("." + builder) for f in files):
            return builder, target
    return None


def _load_hf(shown: str, spec: str) -> dict[str, Any]:
    """split -> Dataset or IterableDataset (streaming for files and hub ids: nothing is converted or cached)."""
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(f"{shown}: HF dataset inputs need `datasets`: pip install 'flamingo-cli[datasets]'") from e

    datasets.disable_progress_bars()  # its bars would tear flamingo's own display
    target, split = _hf_target(spec)
    try:
        if is_saved_dataset(target):
            loaded = datasets.load_from_disk(target)
        elif (files := _data_files(target)) is not None:
            builder, where = files
            if where.lower().endswith("." + builder):
                loaded = datasets.load_dataset(builder, data_files={"train": where}, streaming=True)
            else:
                loaded = datasets.load_dataset(builder, data_dir=where, streaming=True)
        else:
            loaded = datasets.load_dataset(target, streaming=True)
    except FileNotFoundError as e:
        raise CorpusError(f"{shown}: dataset not found ({remote.redact(str(e))})") from e
    except Exception as e:  # datasets raises many kinds (DatasetNotFoundError, ValueError, …)
        raise CorpusError(f"{shown}: cannot load dataset ({type(e).__name__}: {remote.redact(str(e))})") from e
    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = dict(loaded.items())
    else:
        splits = {str(getattr(loaded, "split", None) or "train"): loaded}
    if split is not None:
        if split not in splits:
            raise CorpusError(f"{shown}: no split {split!r} (has {', '.join(splits)})")
        splits = {split: splits[split]}
    return splits


def _audio_column(shown: str, features: Any) -> str:
    import datasets

    if features is None:
        raise CorpusError(f"{shown}: dataset has no known features (cannot find its Audio column)")
    for name, feature in features.items():
        if isinstance(feature, datasets.Audio):
            return name
    for name, feature in features.items():
        if isinstance(feature, dict) and "bytes" in feature and "path" in feature:
            return name
    raise CorpusError(f"{shown}: no Audio column (columns: {', '.join(features)})")


def _prepared(shown: str, ds: Any) -> tuple[Any, str]:
    import datasets

    column = _audio_column(shown, ds.features)
    return ds.cast_column(column, datasets.Audio(decode=False)), column


def probe_hf(shown: str, spec: str) -> None:
    for ds in _load_hf(shown, spec).values():
        _prepared(shown, ds)


def _hf_item(shown: str, row: Mapping[str, Any], column: str, where: str, base: str, with_data: bool) -> AudioItem:
    """One dataset row: its bytes (or its path, resolved against the dataset's folder) and its columns."""
    origin, path = f"{shown}:{where}", f"{shown}#{where}"
    audio = row.get(column) or {}
    data, audio_path = audio.get("bytes"), audio.get("path")
    if data is None and audio_path:
        path = _resolve(base, audio_path)
    elif audio_path:
        path = f"{path}:{audio_path}"
    error = "row has no audio" if with_data and data is None and not audio_path else None
    return row_item(row, path, origin, where, column=column, error=error, data=data)


def iter_hf(shown: str, spec: str, with_data: bool = True) -> Iterator[AudioItem]:
    """Rows in split order, then row order. ``with_data=False`` leaves the audio column unread (ids and
    metadata only: for counting)."""
    target, _ = _hf_target(spec)
    # Where relative audio paths in rows resolve: the dataset folder (or the Parquet/Arrow file's folder).
    if remote.is_url(target):
        base = remote.parent(target.rstrip("/") + "/x")
    else:
        base = os.path.abspath(target if os.path.isdir(target) else os.path.dirname(target) or ".")
    seen = SeenIds()
    for split, ds in _load_hf(shown, spec).items():
        ds, column = _prepared(shown, ds)
        if not with_data:
            ds = ds.remove_columns([column])
        for n, row in enumerate(ds):
            where = f"{split}/{n}"
            yield seen.check(_hf_item(shown, row, column, where, base, with_data), where)


def hf_kind(spec: str) -> bool:
    return spec.startswith(HF_PREFIX) and not spec.startswith("hf://")
