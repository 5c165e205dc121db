"""``flamingo browse --serve``: the report and its audio over HTTP on 127.0.0.1, for a person on another
machine through an SSH tunnel (``ssh -L 8765:127.0.0.1:8765 host``, then http://127.0.0.1:8765/).

Python's ``http.server`` with byte ranges (``Range: bytes=a-b``, answered 206), which players need to
seek. ``/_audio/<absolute path>`` sends a source file only if the report lists it (``sources.txt``);
everything else comes from the report folder, never from outside it.
"""

from __future__ import annotations

import mimetypes
import re
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 1 << 16


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server (not yet serving) of the report in ``folder``; port 0 picks a free one."""
    root = Path(folder).resolve()
    listed = root / "sources.txt"
    allowed = frozenset(listed.read_text(encoding="utf-8").splitlines()) if listed.exists() else frozenset()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._send(head=False)

        def do_HEAD(self) -> None:
            self._send(head=True)

        def _file(self) -> Path | None:
            path = unquote(urlsplit(self.path).path)
            if path.startswith("/_audio/"):
                source = path[len("/_audio") :]
                return Path(source) if source in allowed else None
            target = (root / path.lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            return target if target.is_relative_to(root) else None

        def _send(self, head: bool) -> None:
            path = self._file()
            if path is None or not path.is_file():
                self.send_error(HTTPStatus.NOT_FOUND, "not in this report")
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            m = _RANGE.match(self.headers.get("Range", "").strip())
            status = HTTPStatus.OK
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # the last N bytes
                    start = max(size - int(m.group(2)), 0)
                if start > end or start >= size:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start + 1))
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            with open(path, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        break
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):
                        return
                    left -= len(data)

    return ThreadingHTTPServer((host, port), Handler)


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8765, on_ready: Any = None) -> None:
    """Serve the report until interrupted (Ctrl-C)."""
    server = make_server(folder, host, port)
    if on_ready is not None:
        on_ready(f"http://{host}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
