"""Inputs that live behind a URL (s3://, gs://, az://, hf://, http(s)://, file://, chained tar://…::s3://…).

Everything goes through fsspec, so each store reads its credentials the way its own library does
(AWS env vars/profiles for s3fs, ADC for gcsfs, HF_TOKEN for huggingface_hub, …); flamingo never takes
or logs a secret. Every message built from a URL goes through ``redact`` (userinfo and query values
such as presigned-URL signatures are dropped).

fsspec and the store libraries are imported on first use, so the CLI's help path stays instant.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

# "s3://…", "hf://…", "tar://m::s3://…"; not "C:\\…" (one letter) nor a plain relative path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")
_QUERY = re.compile(r"\?[^:]*")


def is_url(path: str) -> bool:
    """True for anything fsspec should open (a scheme of two letters or more, or a chained URL)."""
    return bool(_URL.match(path)) or ("::" in path and bool(_URL.search(path.split("::")[-1])))


def redact(url: str) -> str:
    """The URL without credentials: ``s3://key:secret@b/x?X-Amz-Signature=…`` -> ``s3://b/x?…``."""
    parts = []
    for part in url.split("::"):
        part = _USERINFO.sub(r"\1", part)
        parts.append(_QUERY.sub("?…", part))
    return "::".join(parts)


def url_to_fs(url: str) -> tuple[Any, str]:
    """(filesystem, path inside it); raises OSError naming the (redacted) URL when no backend fits."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise OSError(
            f"{redact(url)}: this store needs an extra package ({e}); pip install 'flamingo-cli[remote]'"
        ) from e
    except ValueError as e:
        raise OSError(f"{redact(url)}: {e}") from e


def protocol_of(url: str) -> str:
    return url.split("::")[-1].split("://", 1)[0].lower()


def join(base_url: str, rel: str) -> str:
    """``rel`` resolved against the folder ``base_url`` (a URL); ``rel`` may itself be a URL or absolute."""
    if is_url(rel):
        return rel
    scheme, sep, rest = base_url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {base_url}")
    if rel.startswith("/"):
        # An absolute path in a remote manifest: a key from the bucket root for object stores.
        bucket = rest.split("/", 1)[0]
        return f"{scheme}://{bucket}{posixpath.normpath(rel)}"
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"


def parent(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def basename(url: str) -> str:
    return posixpath.basename(url.split("::")[0].split("?", 1)[0].rstrip("/"))


def open_binary(url: str, block_size: int | None = None) -> IO[bytes]:
    """A seekable binary file object; reads are ranged (S3 GET Range) in ``block_size`` blocks, so a
    segment never downloads the whole object. Raises FileNotFoundError / PermissionError / OSError."""
    fs, path = url_to_fs(url)
    if "::" in url:  # chained (tar://member::s3://…): the member reads through the outer file
        f = fs.open(path, "rb")
        f._flamingo_fs = fs  # the archive filesystem owns the outer file: keep it alive with the member
        return f
    return fs.open(path, "rb", **({} if block_size is None else {"block_size": block_size}))


def info(url: str) -> dict[str, Any]:
    fs, path = url_to_fs(url)
    return fs.info(path)


def exists(url: str) -> tuple[bool, bool]:
    """(exists, is a directory) for a URL; raises OSError (e.g. PermissionError) when the store refuses."""
    fs, path = url_to_fs(url)
    try:
        st = fs.info(path)
    except FileNotFoundError:
        return False, False
    return True, st.get("type") == "directory"


def walk_files(url: str) -> Iterator[tuple[str, str]]:
    """(relative path, full URL) of every file under the folder ``url``, in sorted relative-path order,
    hidden names (any part starting with ".") skipped: the same order a local folder scan gives.

    One recursive listing (``find``: a flat paginated LIST on object stores, not one call per folder).
    """
    fs, root = url_to_fs(url)
    root = root.rstrip("/")
    scheme = url.partition("://")[0]
    fs.invalidate_cache(root)  # a fresh listing each run (a long-lived process may hold an old one)
    listed = fs.find(root, withdirs=False)
    rels = []
    for p in listed:
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if rel and not any(part.startswith(".") for part in rel.split("/")):
            rels.append(rel)
    rels.sort()
    prefix = url.rstrip("/")
    if not prefix.startswith(scheme + "://"):
        prefix = f"{scheme}://{root}"
    for rel in rels:
        yield rel, f"{prefix}/{rel}"


def _mtime_ns(st: dict[str, Any]) -> int | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = st.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return int(value.timestamp() * 1_000_000_000)
        if isinstance(value, int | float):
            return int(value * 1_000_000_000) if value < 1e12 else int(value)
        if isinstance(value, str):
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1_000_000_000)
            except ValueError:
                continue
    return None


def stamp(text: str | bytes) -> int:
    """A 63-bit number from an ETag/version id or content, where a store has no modification time."""
    data = text.encode() if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def version_of(st: dict[str, Any]) -> tuple[int, int | None]:
    """(size, mtime_ns) from ``fs.info``: the modification time where the store has one, else a stamp
    of its ETag / version id / blob id (a new upload changes both)."""
    size = int(st.get("size") or st.get("Size") or 0)
    mtime = _mtime_ns(st)
    if mtime is None:
        for key in ("VersionId", "version_id", "ETag", "etag", "md5Hash", "blob_id", "oid", "sha"):
            if st.get(key):
                return size, stamp(str(st[key]))
    return size, mtime
