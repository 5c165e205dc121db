"""The writing of a run's parts exactly once, on a local folder or an object store, behind one interface.

Both writers have one interface (``PartWriter``): ``open_writer`` opens one for a run (taking its
lock), ``commit`` makes one part visible atomically, ``close`` releases the lock. Which writer a
run gets is decided once, from OUT's ``folder.Folder``.

Exactly-once, crash-safe writing (local folders):

* a part is written to ``OUT/run=<key>/.tmp/<name>.tmp``, fsynced, ``os.replace``-d into place and the
  directory fsynced, so a reader never sees a half-written part (pyarrow, duckdb and pandas skip
  paths starting with ``.`` or ``_``); leftovers in ``.tmp`` from a crash are deleted on open;
* one ``Sink`` per run at a time: an exclusive ``flock`` on ``OUT/run=<key>/.lock`` makes a second
  one (say an overlapping cron job) fail with ``LockedError`` instead of writing duplicates; a
  shard takes it shared plus its own shard lock, so shards of one run write side by side.

Object stores (S3 and S3-compatible servers through s3fs; ``objstore.py``) have no rename and no
flock. The same guarantees come from conditional writes (``If-None-Match: *`` create-if-absent and
``If-Match: <etag>`` replace-if-unchanged), checked at open with a probe (a store that ignores them
is refused). Under ``OUT/run=<key>/_flamingo/``:

* ``lease-<slot>.json`` (slot ``all``, or ``s<i>of<n>`` for ``--shard i/n``): the lock. Created
  if absent; a live one (``expires_at`` ahead) refuses the second writer (``LockedError``, exit 5);
  an expired one (its writer died) is taken over by replace-if-unchanged, so of two takers one wins.
  The holder renews it every third of its lifetime (``FLAMINGO_LEASE_SECONDS``, default 60). A whole
  run and the shards of it exclude each other (each checks the other's lease after taking its own).
* ``log-<slot>/<seq:010d>.json``: the commit log, each entry created-if-absent at the next seq. A
  writer opens with ``{"kind": "open", "epoch": E}`` (E one above the log's highest); each part is
  committed by ``{"kind": "part", "epoch": E, "part": name}``. A part entry counts only under the
  latest epoch opened before it, so a writer paused past its lease (a zombie) is fenced out: its
  next commit meets the new writer's ``open`` entry and it stops with ``LockedError``.
* a part is PUT once under a unique key in ``staging/`` (a PUT is atomic), committed in the log,
  then copied to ``run=<key>/<name>`` where readers look, and the staged copy deleted. Plain readers
  therefore only ever see committed parts; the resume index reads the committed parts only (the
  staged copy of a committed part whose writer died before the copy). An uncommitted staged part
  (a writer killed between PUT and commit) is garbage: the next writer of its slot deletes it, and
  finishes the copies of committed ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_cli.errors import LockedError, OutputError
from flamingo_cli.output import objstore
from flamingo_cli.output.folder import Folder, describe_oserror, fsync_path, open_folder, write_atomically
from flamingo_cli.output.layout import (
    LOCK_FILE,
    META_DIR,
    PART_RE,
    PART_SUFFIX,
    SCAN_FILE,
    STAGED_SUFFIX,
    STAGING_DIR,
    TMP_DIR,
    committed,
    folder_part_files,
    read_log,
    trusted,
)

LEASE_SECONDS = 60.0


class PartWriter(Protocol):
    """What the sink writes through: one run's lock held from open to ``close``, parts committed one by one."""

    out_dir: Path | str
    run_dir: Path | str

    def commit(self, table: pa.Table, committed: Callable[[], None]) -> None:
        """Make ``table`` the run's next part, atomically; ``committed()`` is called once it counts
        (a later failure, a directory fsync or an S3 copy, still raises OutputError after it)."""
        ...

    def record_scan(self, doc: Mapping[str, Any]) -> None:
        """Keep the run's latest complete scan counts (``SCAN_FILE``) where the layout reads them; best effort."""
        ...

    def close(self) -> None:
        """Release the run's lock; idempotent."""
        ...


def open_writer(
    out: str | Path,
    run_key: str,
    *,
    shard: tuple[int, int] | None = None,
    lock: bool = True,
    check_writable: bool = True,
    lease_seconds: float | None = None,
) -> PartWriter:
    """Open run ``run_key`` of OUT for writing: a local folder's writer, or an object store's.

    ``lock=False`` skips the run lock; only for tests or callers holding their own lock, since opening
    also deletes leftover temp parts, which a concurrent writer may still be writing.
    """
    folder = open_folder(out)
    if folder.protocol:
        return StoreWriter(folder, run_key, shard, lock, check_writable, lease_seconds)
    return LocalWriter(folder, run_key, shard, lock, check_writable)


def _refuse_file_out(out_dir: Path) -> None:
    """``--out`` naming an existing file (or a path below one) is a usage mistake: say so, not "ENOTDIR"."""
    for p in (out_dir, *out_dir.parents):
        try:
            if p.exists() and not p.is_dir():
                if p == out_dir:
                    raise OutputError(f"--out is a file: {out_dir}; give a directory (it is created if missing)")
                raise OutputError(f"--out {out_dir}: cannot create output directory: {p} is a file")
            if p.exists():
                return
        except PermissionError:
            return


class LocalWriter:
    """A local folder: ``flock`` run lock, parts written in ``.tmp``, fsynced and renamed into place."""

    def __init__(
        self, folder: Folder, run_key: str, shard: tuple[int, int] | None, lock: bool, check_writable: bool
    ) -> None:
        self.folder = folder
        self.run_key = run_key
        self.shard = shard
        self.out_dir: Path = Path(folder.root)
        self.run_dir: Path = self.out_dir / f"run={run_key}"
        # A shard writes its temp parts in its own folder, so it cleans up only what it left.
        self.tmp_dir: Path = self.run_dir / TMP_DIR
        if shard is not None:
            self.tmp_dir = self.tmp_dir / f"shard-{shard[0]}-of-{shard[1]}"
        self._lock_fds: list[int] = []
        _refuse_file_out(self.out_dir)
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(describe_oserror(self.tmp_dir, "create output directory", exc)) from exc
        if lock:
            self._acquire_lock()
        try:
            if check_writable:
                self._probe(self.run_dir)
                self._probe(self.tmp_dir)
            self._clean_tmp()
            seqs = [int(m.group(1)) for p in folder_part_files(folder, run_key) if (m := PART_RE.match(Path(p).name))]
            self._next_seq = max(seqs, default=-1) + 1
        except BaseException:
            self.close()
            raise

    def _acquire_lock(self) -> None:
        """A whole run takes ``.lock`` exclusively; a shard takes it shared plus its own shard lock.

        So shards of one run write side by side, while a second copy of a shard, or an unsharded run
        beside any shard, is refused. The kernel drops a dead process's flock: no stale locks.
        """
        if self.shard is None:
            self._lock_fds.append(self._flock(self.run_dir / LOCK_FILE, fcntl.LOCK_EX, "this run"))
            return
        i, n = self.shard
        self._lock_fds.append(self._flock(self.run_dir / LOCK_FILE, fcntl.LOCK_SH, "this run unsharded"))
        try:
            self._lock_fds.append(
                self._flock(self.run_dir / f"{LOCK_FILE}.shard-{i}-of-{n}", fcntl.LOCK_EX, f"shard {i}/{n}")
            )
        except BaseException:
            self.close()
            raise

    def _flock(self, path: Path, mode: int, what: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(describe_oserror(path, "create lock file", exc)) from exc
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockedError(
                    f"{self.run_dir}: another flamingo process is writing {what} (lock {path} is held); "
                    "it may still be running from an earlier start, so this one exits"
                ) from exc
            raise OutputError(describe_oserror(path, "lock", exc)) from exc
        return fd

    @staticmethod
    def _probe(directory: Path) -> None:
        probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise OutputError(describe_oserror(directory, "write", exc)) from exc

    def _clean_tmp(self) -> None:
        """Delete temp parts a crashed writer left (safe: we hold the run's or our shard's lock).

        An unsharded run holds the run exclusively, so it also clears the shards' temp folders.
        """
        try:
            for entry in self.tmp_dir.iterdir():
                if entry.is_file():
                    entry.unlink(missing_ok=True)
                elif self.shard is None and entry.is_dir() and entry.name.startswith("shard-"):
                    for inner in entry.iterdir():
                        if inner.is_file():
                            inner.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(describe_oserror(self.tmp_dir, "clean leftover temp files", exc)) from exc

    def commit(self, table: pa.Table, committed: Callable[[], None]) -> None:
        name = f"part-{self._next_seq:06d}-{secrets.token_hex(4)}{PART_SUFFIX}"
        write_atomically(
            self.run_dir / name,
            self.tmp_dir / f"{name}.tmp",
            lambda tmp: pq.write_table(table, str(tmp), compression="zstd"),
            "write part",
            durable=True,
        )
        # The part is in place from here on: account for it even if the directory fsync fails.
        self._next_seq += 1
        committed()
        try:
            fsync_path(self.run_dir)
        except OSError as exc:
            raise OutputError(describe_oserror(self.run_dir, "fsync directory", exc)) from exc

    def record_scan(self, doc: Mapping[str, Any]) -> None:
        text = json.dumps(doc, sort_keys=True, ensure_ascii=False)
        with contextlib.suppress(OutputError):
            write_atomically(
                self.run_dir / SCAN_FILE,
                self.tmp_dir / f"{SCAN_FILE}.{os.getpid()}.tmp",
                lambda tmp: tmp.write_text(text, encoding="utf-8"),
            )

    def close(self) -> None:
        while self._lock_fds:
            fd = self._lock_fds.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(fd)


class StoreWriter:
    """An object store: a renewed lease for the lock, parts staged, committed in a log, copied into place."""

    def __init__(
        self,
        folder: Folder,
        run_key: str,
        shard: tuple[int, int] | None,
        lock: bool,
        check_writable: bool,
        lease_seconds: float | None,
    ) -> None:
        self.folder = folder
        self.store = objstore.Store(folder.fs, folder.protocol)
        self.run_key = run_key
        self.shard = shard
        self.out_dir: str = folder.url(folder.root)
        self.run_dir: str = f"{self.out_dir}/run={run_key}"
        self._run_path = folder.join(f"run={run_key}")
        self._meta = f"{self._run_path}/{META_DIR}"
        self._slot = "all" if shard is None else f"s{shard[0]}of{shard[1]}"
        self.tmp_dir: str = f"{self._meta}/{STAGING_DIR}"
        # The lease (path, ETag, owner token), this writer's epoch and next log seq.
        self._lease_seconds = float(lease_seconds or os.environ.get("FLAMINGO_LEASE_SECONDS") or LEASE_SECONDS)
        self._lease_etag: str | None = None
        self._lease_lost: str | None = None
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._lease_mutex = threading.Lock()
        self._owner = secrets.token_hex(8)
        self._epoch = 0
        self._log_next = 0
        self._open_remote(lock, check_writable)

    def _lease_path(self, slot: str) -> str:
        return f"{self._meta}/lease-{slot}.json"

    def _lease_doc(self) -> bytes:
        doc = {
            "owner": self._owner,
            "expires_at": time.time() + self._lease_seconds,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        return json.dumps(doc).encode("utf-8")

    def _live_lease(self, path: str) -> dict[str, Any] | None:
        """The lease at ``path`` if another writer holds it and it has not expired."""
        got = self.store.read(path)
        if got is None:
            return None
        try:
            doc = json.loads(got[0])
        except ValueError:
            return None
        if doc.get("owner") == self._owner or float(doc.get("expires_at", 0)) <= time.time():
            return None
        return doc

    def _locked(self, path: str, doc: Mapping[str, Any], what: str) -> LockedError:
        left = max(0.0, float(doc.get("expires_at", 0)) - time.time())
        return LockedError(
            f"{self.run_dir}: another flamingo process is writing {what} (lease {self.store.url(path)} is held "
            f"by {doc.get('host')} pid {doc.get('pid')}, expires in {left:.0f} s unless renewed); "
            "it may still be running from an earlier start, so this one exits"
        )

    def _take_lease(self) -> None:
        """Create the slot's lease object, or take over one that expired (replace-if-unchanged)."""
        path = self._lease_path(self._slot)
        what = "this run" if self.shard is None else f"shard {self.shard[0]}/{self.shard[1]}"
        for _ in range(5):
            etag = self.store.create(path, self._lease_doc())
            if etag is not None:
                self._lease_etag = etag
                break
            got = self.store.read(path)
            if got is None:  # released between the two calls: try to create it again
                continue
            data, old = got
            try:
                doc = json.loads(data)
            except ValueError:
                doc = {}
            if float(doc.get("expires_at", 0)) > time.time():
                raise self._locked(path, doc, what)
            etag = self.store.replace(path, self._lease_doc(), old)  # the holder died: take it over
            if etag is None:
                raise self._locked(path, doc, what)  # another process took it over first
            self._lease_etag = etag
            break
        else:
            raise OutputError(f"{self.store.url(path)}: cannot take the run's lease (it keeps changing)")
        # A whole run excludes every shard and a shard the whole run: each checks after taking its
        # own lease, so of two that start together at least one sees the other.
        if self.shard is None:
            others = [
                n[len("lease-") : -len(".json")] for n in self.folder.files(self._meta) if n.startswith("lease-s")
            ]
        else:
            others = ["all"]
        for slot in others:
            doc = self._live_lease(self._lease_path(slot))
            if doc is not None:
                self._release_lease()
                label = "this run unsharded" if slot == "all" else f"shard {slot[1:].replace('of', '/')}"
                raise self._locked(self._lease_path(slot), doc, label)

    def _renew_loop(self) -> None:
        while not self._lease_stop.wait(self._lease_seconds / 3):
            self._renew()

    def _renew(self) -> None:
        with self._lease_mutex:
            if self._lease_etag is None or self._lease_lost:
                return
            try:
                etag = self.store.replace(self._lease_path(self._slot), self._lease_doc(), self._lease_etag)
            except objstore.StoreError:
                return  # a transient failure: try again at the next tick (the lease is still valid)
            if etag is None:
                self._lease_lost = "another writer took over the run's lease (this one was paused past its expiry)"
            else:
                self._lease_etag = etag

    def _release_lease(self) -> None:
        self._lease_stop.set()
        thread, self._lease_thread = self._lease_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        store = self.store
        with self._lease_mutex:
            etag, self._lease_etag = self._lease_etag, None
            if etag is None or self._lease_lost:
                return
            path = self._lease_path(self._slot)
            with contextlib.suppress(objstore.StoreError):
                got = store.read(path)
                if got is not None and got[1] == etag:
                    store.delete(path)

    def _append_log(self, entry: dict[str, Any]) -> int:
        """Create the next entry of this slot's log (create-if-absent); returns its seq.

        Stepping over entries others created, a part commit that meets an ``open`` of a newer epoch
        has been fenced out: LockedError, and the part stays uncommitted (garbage, cleaned later).
        """
        log = f"{self._meta}/log-{self._slot}"
        data = json.dumps(entry, sort_keys=True).encode("utf-8")
        seq = self._log_next
        for _ in range(10_000):
            path = f"{log}/{seq:010d}.json"
            if self.store.create(path, data) is not None:
                self._log_next = seq + 1
                return seq
            got = self.store.read(path)
            other = json.loads(got[0]) if got is not None else {}
            if entry["kind"] == "part" and other.get("kind") == "open" and int(other.get("epoch", 0)) > self._epoch:
                self._lease_lost = "another writer took over the run (its commit log moved past this writer's epoch)"
                raise LockedError(f"{self.run_dir}: {self._lease_lost}; this writer stops, the other one goes on")
            seq += 1
        raise OutputError(f"{self.store.url(log)}: cannot append to the commit log")

    def _open_remote(self, lock: bool, check_writable: bool) -> None:
        """Take the lease, open a new epoch in the commit log, finish or clean what a dead writer left."""
        store = self.store
        try:
            if check_writable:
                store.check_conditional(self._meta)
            if lock:
                self._take_lease()
            try:
                log = f"{self._meta}/log-{self._slot}"
                entries = read_log(self.folder, log)
                self._log_next = max((e["_seq"] for e in entries), default=-1) + 1
                top = max((int(e.get("epoch", 0)) for e in entries if e.get("kind") == "open"), default=0)
                if lock:
                    self._epoch = top + 1
                    seq = self._append_log({"kind": "open", "epoch": self._epoch, "owner": self._owner})
                    entries = [e for e in read_log(self.folder, log) if e["_seq"] <= seq]
                else:
                    self._epoch = top
                self._roll_forward(entries)
                if lock:
                    self._lease_thread = threading.Thread(target=self._renew_loop, name="flamingo-lease", daemon=True)
                    self._lease_thread.start()
            except BaseException:
                self._release_lease()
                raise
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        names = [n for n in self.folder.files(self._run_path) if PART_RE.match(n)]
        self._next_seq = max((int(m.group(1)) for n in names if (m := PART_RE.match(n))), default=-1) + 1

    def _mine(self, name: str) -> bool:
        """A part name this writer's slot may clean: its own slot's, or any slot's for a whole run."""
        m = PART_RE.match(name)
        if m is None:
            return False
        return self.shard is None or m.group(2) == self._slot

    def _roll_forward(self, entries: list[dict[str, Any]]) -> None:
        """Copy committed-but-staged parts into place; delete uncommitted ones (a writer died mid-part)."""
        store = self.store
        known = set(committed(self.folder, self._run_path))
        # A whole run holds every slot: it finishes the shards' committed copies too.
        mine = known if self.shard is None else set(trusted(entries))
        staging = f"{self._meta}/{STAGING_DIR}"
        finals = set(self.folder.files(self._run_path))
        for staged in self.folder.files(staging):
            name = staged.removesuffix(STAGED_SUFFIX)
            if not self._mine(name):
                continue
            if name in mine and name not in finals:
                store.copy(f"{staging}/{staged}", f"{self._run_path}/{name}")
            if name not in known or name in mine:
                store.delete(f"{staging}/{staged}")
        for name in finals:
            if self._mine(name) and name not in known:
                store.delete(f"{self._run_path}/{name}")  # a visible part no log commits (never expected)

    def commit(self, table: pa.Table, committed: Callable[[], None]) -> None:
        """Stage the part under a unique key, commit it in the log, then copy it where readers look."""
        store = self.store
        if self._lease_lost:
            raise LockedError(f"{self.run_dir}: {self._lease_lost}; this writer stops, the other one goes on")
        name = f"part-{self._next_seq:06d}-{self._slot}-{secrets.token_hex(4)}{PART_SUFFIX}"
        staged = f"{self._meta}/{STAGING_DIR}/{name}{STAGED_SUFFIX}"
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        try:
            if store.create(staged, buf.getvalue().to_pybytes()) is None:
                raise OutputError(f"{store.url(staged)}: a part of that name exists already")
            try:
                self._append_log({"kind": "part", "epoch": self._epoch, "part": name, "rows": table.num_rows})
            except BaseException:
                with contextlib.suppress(objstore.StoreError):
                    store.delete(staged)
                raise
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc
        # Committed from here on: account for it even if the copy fails (the next open finishes it).
        self._next_seq += 1
        committed()
        try:
            store.copy(staged, f"{self._run_path}/{name}")
            store.delete(staged)
        except objstore.StoreError as exc:
            raise OutputError(str(exc)) from exc

    def record_scan(self, doc: Mapping[str, Any]) -> None:
        """Scan counts are kept for local outputs only (the summary has them too)."""

    def close(self) -> None:
        self._release_lease()
