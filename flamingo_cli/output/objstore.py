"""The S3 conditional writes the object-store writer needs where there is no atomic rename nor flock.

Only conditional writes make a lock and a commit log safe on an object store: a create that fails when
the key exists (S3 ``If-None-Match: *``) and a replace that fails when the object changed since it was
read (S3 ``If-Match: <etag>``). ``open_store`` returns a ``Store`` for the stores known to give both
(S3 and S3-compatible servers through s3fs) and raises ``StoreError`` for any other URL, so flamingo
never writes somewhere it cannot keep its exactly-once promise (and never a local folder named
``s3:``). ``Store.check_conditional`` proves at open that the server really honours the conditions
(some older S3-compatible servers ignore them).

Credentials are whatever the library reads (env, profiles, instance roles); nothing here logs them:
messages name the URL only.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Any

# URL schemes served by s3fs (the conditional writes below use its S3 client).
S3_PROTOCOLS = frozenset({"s3", "s3a"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class StoreError(Exception):
    """The store cannot be used for output (unsupported scheme, no conditional writes, I/O failure)."""


def _precondition_failed(exc: BaseException) -> bool:
    """The store refused a conditional write (the key exists / the object changed)."""
    if isinstance(exc, FileExistsError):
        return True
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {})
            meta = response.get("ResponseMetadata", {})
            if str(err.get("Code")) in _PRECONDITION_CODES or str(meta.get("HTTPStatusCode")) in ("412", "409"):
                return True
        e = e.__cause__ or e.__context__
    return False


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError)


class Store:
    """One S3 bucket prefix through s3fs: read, conditional create/replace, copy, delete.

    Paths are s3fs paths without the scheme (``bucket/prefix/key``); ``url(path)`` adds it back for
    messages. Listing is ``folder.Folder``'s (one listing for local folders and stores).
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol

    def url(self, path: str) -> str:
        return f"{self.protocol}://{path}"

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def _fail(self, path: str, action: str, exc: BaseException) -> StoreError:
        return StoreError(f"{self.url(path)}: cannot {action}: {type(exc).__name__}: {exc}")

    def create(self, path: str, data: bytes) -> str | None:
        """Write ``path`` only if it does not exist: its ETag, or None when it already exists."""
        return self._put_if(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``path`` only if its ETag is still ``etag``: the new ETag, or None if it changed."""
        return self._put_if(path, data, IfMatch=etag)

    def _put_if(self, path: str, data: bytes, **condition: str) -> str | None:
        """One conditional PUT: the new ETag, or None when the store refused the condition.

        A replace of an object that is gone (404) is refused too: the object changed.
        """
        bucket, key = self._split(path)
        try:
            resp = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as exc:
            if _precondition_failed(exc) or ("IfMatch" in condition and _not_found(exc)):
                return None
            raise self._fail(path, "write", exc) from exc
        finally:
            self.fs.invalidate_cache(path)
        return str(resp.get("ETag", ""))

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if it does not exist."""
        bucket, key = self._split(path)
        try:
            resp = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._fail(path, "read", exc) from exc
        body = resp["Body"]
        try:
            data = _read_body(self.fs, body)
        finally:
            with contextlib.suppress(Exception):
                body.close()
        return data, str(resp.get("ETag", ""))

    def put(self, path: str, data: bytes) -> None:
        """A plain (atomic, last-writer-wins) PUT; for keys only this writer uses."""
        try:
            self.fs.pipe_file(path, data)
        except Exception as exc:
            raise self._fail(path, "write", exc) from exc

    def copy(self, src: str, dst: str) -> None:
        """Server-side copy (atomic for the reader of ``dst``)."""
        try:
            self.fs.copy(src, dst)
        except Exception as exc:
            raise self._fail(dst, "copy into place", exc) from exc
        finally:
            self.fs.invalidate_cache(dst)

    def delete(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail(path, "delete", exc) from exc
        finally:
            self.fs.invalidate_cache(path)

    def check_conditional(self, folder: str) -> None:
        """Prove that the server refuses a second conditional create of one key; StoreError if not."""
        probe = f"{folder.rstrip('/')}/probe-{secrets.token_hex(6)}"
        try:
            if self.create(probe, b"1") is None:
                raise StoreError(f"{self.url(probe)}: a fresh probe key already exists; cannot check the store")
            if self.create(probe, b"2") is not None:
                raise StoreError(
                    f"{self.url(folder)}: the store ignores conditional writes (If-None-Match: *), so flamingo "
                    "cannot lock the run or commit parts exactly once there; write to a local folder or to a "
                    "store that supports them (AWS S3, MinIO)"
                )
        finally:
            with contextlib.suppress(StoreError):
                self.delete(probe)


def _read_body(fs: Any, body: Any) -> bytes:
    """Read an aiobotocore streaming body on s3fs's event loop."""
    from fsspec.asyn import sync

    async def _read() -> bytes:
        return await body.read()

    return sync(fs.loop, _read)


def open_store(url: str) -> tuple[Store, str]:
    """The Store for ``url`` and the path (no scheme) of its root; StoreError for unsupported stores."""
    protocol = str(url).split("://", 1)[0].lower()
    if protocol not in S3_PROTOCOLS:
        raise StoreError(
            f"{url}: flamingo writes output to local folders and S3 (s3://) only: a {protocol}:// store is not "
            "known to give the conditional writes (create-if-absent, replace-if-unchanged) that keep the run "
            "lock and exactly-once parts safe; write locally and copy, or use an S3-compatible store"
        )
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec ships with the base install
        raise StoreError(f"{url}: fsspec is not installed") from exc
    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        raise StoreError(f"{url}: s3:// output needs s3fs: pip install 'flamingo-cli[s3]' ({exc})") from exc
    except Exception as exc:
        raise StoreError(f"{url}: cannot open the store: {type(exc).__name__}: {exc}") from exc
    root = str(root).rstrip("/")
    if "/" not in root:
        raise StoreError(f"{url}: name a prefix inside the bucket (s3://bucket/captions), not the bucket alone")
    return Store(fs, protocol), root
