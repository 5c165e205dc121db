"""A real S3-compatible HTTP server on localhost for tests (moto's server mode), not a mocked client.

``s3_env`` starts one ``ThreadedMotoServer`` per test session on a free port and points every S3
client in this process and in subprocesses it starts (through the environment) at it: s3fs/botocore
read ``AWS_ENDPOINT_URL`` and the dummy credentials from the environment like they would read real
ones. ``s3_bucket`` gives each test a fresh bucket.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment that points S3 clients at the local server (also exported to os.environ)."""
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return env


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket: its name."""
    import s3fs

    name = f"test-{secrets.token_hex(6)}"
    s3fs.S3FileSystem(anon=False).mkdir(name)
    return name


def subprocess_env(s3_env: dict[str, str]) -> dict[str, str]:
    """os.environ plus the S3 settings, for writers started as subprocesses."""
    return {**os.environ, **s3_env}
