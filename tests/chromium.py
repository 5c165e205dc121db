"""A small headless Chromium driver over the DevTools protocol, for the browse tests and
scripts/bench_browse.py: no browser download, no chromedriver, no package (the websocket client below
is the standard library's sockets, the few lines a localhost DevTools connection needs); Debian's
/usr/bin/chromium.

    with Chromium() as page:
        page.open("file:///tmp/report/index.html")
        page.wait("window.flamingoReady === true")
        rows = page.eval("document.querySelectorAll('tbody tr').length")

It records what a test checks: console errors and uncaught exceptions (``errors``) and every request
the page makes (``requests``, by URL), so a test can assert the report needs nothing but file://.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def chromium_binary() -> str | None:
    """Debian's chromium (or $CHROMIUM), else None."""
    for name in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


class Chromium:
    """One headless Chromium process and one page (tab), driven over the DevTools websocket."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900) -> None:
        self.binary = binary or chromium_binary()
        if not self.binary:
            raise RuntimeError("no chromium binary (apt-get install chromium)")
        self.size = (width, height)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self._id = 0

    def __enter__(self) -> Chromium:
        self._profile = tempfile.mkdtemp(prefix="flamingo-chromium-")
        args = [
            self.binary,
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--mute-audio",
            "--autoplay-policy=no-user-gesture-required",  # tests press play from script
            "--remote-debugging-port=0",
            f"--user-data-dir={self._profile}",
            f"--window-size={self.size[0]},{self.size[1]}",
            "about:blank",
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{self.binary} did not start (exit {self._proc.returncode})")
            time.sleep(0.05)
        port = int(port_file.read_text().split("\n")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        page = next(t for t in targets if t.get("type") == "page")
        self._ws = _WebSocket(page["webSocketDebuggerUrl"])
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
            self.send(method)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.size[0],
            height=self.size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        ws = getattr(self, "_ws", None)
        if ws is not None:
            ws.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    # --- the protocol ----------------------------------------------------------------------------------

    def _event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params") or {}
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args") or []
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails") or {}
            self.errors.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
            e = params["entry"]
            self.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One command; events that arrive before its answer are recorded."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=120))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result") or {}
            self._event(msg)

    def pump(self, seconds: float = 0.2) -> None:
        """Record the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._event(json.loads(self._ws.recv(timeout=left)))
            except TimeoutError:
                return

    # --- what tests use -------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited)."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return (res.get("result") or {}).get("value")

    def wait(self, expression: str, timeout: float = 30.0) -> float:
        """Poll until ``expression`` is truthy; the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                if self.eval(expression):
                    return time.monotonic() - t0
            except RuntimeError:
                pass  # the page is still navigating
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{expression!r} still false after {timeout} s; errors: {self.errors}")
            self.pump(0.02)

    def screenshot(self, path: str | Path, scale: float = 1.0) -> Path:
        """The viewport as a PNG, ``scale``d (0.5: half the width and height)."""
        clip = {"x": 0, "y": 0, "width": self.size[0], "height": self.size[1], "scale": scale}
        data = self.send("Page.captureScreenshot", format="png", clip=clip)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


class _WebSocket:
    """A client websocket to ws://127.0.0.1:<port>/<path> (RFC 6455: text frames, masked sends)."""

    def __init__(self, url: str) -> None:
        hostport, _, path = url.removeprefix("ws://").partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            got = self.sock.recv(4096)
            if not got:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += got
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the websocket: {head[:200]!r}")

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack(">H", n)
            if n < 65536
            else bytes([0x80 | 127]) + struct.pack(">Q", n)
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(head + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            got = self.sock.recv(1 << 20)
            if not got:
                raise ConnectionError("DevTools closed the connection")
            self.buf += got
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, timeout: float) -> str:
        """The next text message (continuation frames joined); TimeoutError if none comes in time."""
        self.sock.settimeout(timeout)
        parts = []
        while True:
            try:
                b0, b1 = self._read(2)
            except TimeoutError as exc:
                raise TimeoutError from exc
            self.sock.settimeout(60)  # the rest of a started frame comes
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode in (0, 1, 2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()
            self.sock.settimeout(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))
        self.sock.close()
