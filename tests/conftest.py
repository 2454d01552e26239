"""Shared fixtures: a moto S3 server and an object store on each backend."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from exforge.store import FileStore, ObjectStore, S3Store

S3_TEST_KEY = "testing"
MOTO_START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unique_bucket_name() -> str:
    """A valid S3 bucket name, different for every call."""
    return f"test-{uuid.uuid4().hex[:16]}"


def _wait_until_serving(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll `url` until the server answers any HTTP response; fail if it dies or stalls."""
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"moto server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # an HTTP error response still means it is serving
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"moto server not serving {url} after {MOTO_START_TIMEOUT_S}s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server for the whole session; yields its "127.0.0.1:PORT"."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as log_handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_serving(proc, f"http://127.0.0.1:{port}/", log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty object store on each backend: files under tmp_path, or a fresh S3 bucket."""
    if request.param == "file":
        return FileStore(tmp_path / "store")
    return S3Store(
        bucket=_unique_bucket_name(),
        endpoint=request.getfixturevalue("s3_endpoint"),
        access_key=S3_TEST_KEY,
        secret_key=S3_TEST_KEY,
        secure=False,
    )


@pytest.fixture
def s3_settings_env(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """Point the EXFORGE_* store settings at a new (not yet created) bucket; return its name."""
    bucket = _unique_bucket_name()
    monkeypatch.setenv("EXFORGE_STORE_URL", f"s3://{bucket}")
    monkeypatch.setenv("EXFORGE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("EXFORGE_S3_ACCESS_KEY", S3_TEST_KEY)
    monkeypatch.setenv("EXFORGE_S3_SECRET_KEY", S3_TEST_KEY)
    monkeypatch.setenv("EXFORGE_S3_SECURE", "false")
    return bucket
