"""Shared fixtures: a moto S3 server, an object store on each backend, a PostgreSQL server
and a database on each backend, the embedded broker and isolated pipelines on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from exforge.core.stack import free_port
from exforge.core.store import FileStore, ObjectStore, S3Store
from tests.postgres import PostgresServer, running_postgres
from tests.support.processes import wait_while_logging

if TYPE_CHECKING:
    from exforge.core.settings import Settings

# Triton kernels (workers/trainer/kernels.py) run in Triton's interpreter, on CPU tensors.
# `triton.jit` reads this when it decorates, also for triton.language's own helpers, and
# transformers imports triton: it must be set before anything imports transformers.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Skips and xfails fail the suite (install what is missing); every module is in a group.
pytest_plugins = ["tests.support.no_skips", "tests.support.groups"]

S3_TEST_KEY = "testing"
MOTO_START_TIMEOUT_S = 30.0


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


# --------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own for the whole session, on a free loopback port."""
    with running_postgres(free_port()) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database on each backend: a SQLite file, or a new PostgreSQL
    database (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'exforge.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


# --------------------------------------------------------------------- the pipeline

REPO = Path(__file__).resolve().parent.parent
EXFORGE = str(Path(sys.executable).parent / "exforge")
CLI_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded Tansu broker, started by exforge's own stack code; yields bootstrap."""
    from exforge.core import stack
    from exforge.core.settings import load_settings

    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("broker"), embedded_kafka_port=free_port()
    )
    stack.start_broker(settings)
    try:
        yield settings.bootstrap
    finally:
        stack.down(settings)


@dataclass
class Pipeline:
    """One isolated exforge deployment on the shared broker: own topic prefix, data dir."""

    env: dict[str, str]

    @property
    def settings(self) -> Settings:
        from exforge.core.settings import Settings

        overrides = {
            k.removeprefix("EXFORGE_").lower(): v
            for k, v in self.env.items()
            if k.startswith("EXFORGE_")
        }
        return Settings(**overrides)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [EXFORGE, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"exforge {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start_worker(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as handle:
            return subprocess.Popen(
                [EXFORGE, "worker", *args],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def run_until_idle(self) -> None:
        log = Path(self.env["EXFORGE_DATA_DIR"]) / "until-idle.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # the worker's log stays beside the data: the first place to look when a check fails
        with log.open("ab") as handle:
            worker = subprocess.Popen(
                [EXFORGE, "worker", "--until-idle"],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            # no limit on the whole run (a loaded machine slows it down), only on silence
            code = wait_while_logging(worker, log, CLI_TIMEOUT_S)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        if code is None:
            pytest.fail(f"worker --until-idle logged nothing for {CLI_TIMEOUT_S} s; see {log}")
        if code != 0:
            pytest.fail(f"worker --until-idle exited {code}; see {log}")


@pytest.fixture
def pipeline(broker: str, tmp_path: Path) -> Pipeline:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(
        EXFORGE_KAFKA_BOOTSTRAP=broker,
        EXFORGE_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}.",
        EXFORGE_DATA_DIR=str(tmp_path / "data"),
        EXFORGE_METRICS_PORT="0",
        EXFORGE_IDLE_SECONDS="1",
        # a new consumer group forms in half of this on the embedded broker (5 s by default)
        EXFORGE_KAFKA_SESSION_TIMEOUT_S="3",
        EXFORGE_CONFIG=str(tmp_path / "absent.toml"),
        # exact per-function counts; every generator: tests/test_dataset_pipeline.py
        EXFORGE_INSTRUCT_KINDS="doc_to_code",
    )
    return Pipeline(env)


EXCLUDED: list[str] = []  # the corpus exclusions tests recorded, in this process or a worker


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from tests.support.corpus import EXCLUSION

    if report.when == "call":  # the setup and teardown reports carry the same properties
        EXCLUDED.extend(str(v) for name, v in report.user_properties if name == EXCLUSION)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List every real corpus file a test left out of a comparison, with its reason."""
    if EXCLUDED:
        terminalreporter.section("corpus files left out of comparisons")
        for line in EXCLUDED:
            terminalreporter.write_line(line)


# --------------------------------------------------------------------- serving


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Tiny-model versions exported and served by two tritonservers, shared by the
    serving tests (tests/support/serving.py says which version is which)."""
    from tests.support.serving import serve_versions

    with serve_versions(tmp_path_factory.mktemp("serving")) as served:
        yield served
