"""OUT as one folder abstraction over fsspec (a filesystem plus a root path), local or remote decided once.

Modelled on datatrove's ``DataFolder``: ``open_folder`` looks at OUT once (``remote.is_url``, the one
"is this a URL" test) and returns a ``Folder`` over fsspec's local filesystem, or over s3fs for an
``s3://`` URL (any other store is refused: ``objstore.open_store``); every reader and writer then
lists and names paths through it without asking again. Paths are the filesystem's
own (``out/run=k`` locally, ``bucket/prefix/run=k`` on S3); ``url`` turns one back into what a user
sees. ``describe_oserror`` words a failed local operation the way every output message does, and
``write_atomically`` is the one temp-then-rename write of a local file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flamingo_cli.errors import OutputError
from flamingo_cli.output import objstore
from flamingo_cli.remote import is_url, protocol_of

# Schemes that name the local filesystem (fsspec's own spellings).
LOCAL_PROTOCOLS = frozenset({"file", "local"})


def describe_oserror(path: Path | str, action: str, exc: OSError) -> str:
    """``path: cannot <action>: <reason> (<exc>)``, the reason in words for the usual errnos."""
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        reason = "disk quota exceeded"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    else:
        reason = exc.strerror or type(exc).__name__
    return f"{path}: cannot {action}: {reason} ({exc})"


def fsync_path(path: Path | str) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    target: Path, tmp: Path, write: Callable[[Path], object], action: str = "write", durable: bool = False
) -> None:
    """``write(tmp)``, fsync it if ``durable``, then ``os.replace`` it onto ``target``, so ``target``
    appears whole or not at all; on OSError ``tmp`` is removed and OutputError names ``target``."""
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(describe_oserror(target, action, exc)) from exc


def local_path(out: str | Path) -> Path | None:
    """The local folder OUT names (a path, or a ``file://`` URL), or None when OUT is a store's URL."""
    text = str(out)
    if not is_url(text):
        return Path(text)
    if protocol_of(text) in LOCAL_PROTOCOLS and "::" not in text:
        return Path(text.split("://", 1)[1])
    return None


class Folder:
    """An fsspec filesystem and the root path of OUT inside it.

    ``protocol`` is empty for the local filesystem (paths are then plain paths, as given) and the
    URL scheme of a store otherwise. Listings always ask the filesystem afresh (no cached listing).
    """

    def __init__(self, fs: Any, root: str, protocol: str = "") -> None:
        self.fs = fs
        self.root = root
        self.protocol = protocol

    def join(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below the root."""
        return posixpath.normpath(posixpath.join(self.root, *parts))

    def url(self, path: str) -> str:
        """What a user sees for ``path``: the path itself locally, ``<scheme>://path`` on a store."""
        return f"{self.protocol}://{path}" if self.protocol else path

    def _entries(self, path: str, kind: str) -> list[str]:
        """Names (not paths) of the entries of ``kind`` (file, directory) directly under ``path``."""
        try:
            self.fs.invalidate_cache(path)
            entries = self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise OutputError(describe_oserror(self.url(path), "list", exc)) from exc
        except Exception as exc:
            raise OutputError(f"{self.url(path)}: cannot list: {type(exc).__name__}: {exc}") from exc
        parent = self.fs._strip_protocol(path).rstrip("/")
        names = []
        for e in entries:
            name = str(e["name"]).rstrip("/")
            typ = e.get("type")
            if e.get("islink"):  # a symlink counts as what it points to, as os.scandir's is_dir() has it
                typ = "directory" if self.fs.isdir(name) else "file" if self.fs.isfile(name) else typ
            if typ == kind and posixpath.dirname(name) == parent:
                names.append(posixpath.basename(name))
        return sorted(names)

    def files(self, path: str) -> list[str]:
        """Names of the files (objects) directly under ``path``; [] if there is no such folder."""
        return self._entries(path, "file")

    def dirs(self, path: str) -> list[str]:
        """Names of the folders (common prefixes on a store) directly under ``path``."""
        return self._entries(path, "directory")

    def arrow(self) -> tuple[Any, Callable[[str], str]]:
        """pyarrow's filesystem for this folder (None: the local one) and a map from ``url()`` to its paths."""
        if not self.protocol:
            return None, str
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self.fs)), lambda url: url.split("://", 1)[1]


def open_folder(out: str | Path) -> Folder:
    """The Folder for OUT: local, or S3's (``objstore.open_store``); OutputError for any other store."""
    local = local_path(out)
    if local is not None:
        from fsspec.implementations.local import LocalFileSystem

        return Folder(LocalFileSystem(), str(local))
    try:
        store, root = objstore.open_store(str(out))
    except objstore.StoreError as exc:
        raise OutputError(str(exc)) from exc
    return Folder(store.fs, root, store.protocol)
