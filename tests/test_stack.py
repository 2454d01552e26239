"""`exforge stack`, `topics`, `doctor` and an external producer, on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaProducer
from conftest import CLI_TIMEOUT_S, REPO, Pipeline

from exforge.core.stack import ephemeral_ports, free_port, port_open, process_alive
from exforge.core.store import open_store
from schemas.catalogue import CATALOGUE
from schemas.records import SourceRequest
from streams.sources.local import upload_directory
from tests.support.processes import pidfds, still_running

pytestmark = pytest.mark.slow
UNSEEN = REPO / "tests" / "fixtures" / "unseen_project"


def test_free_ports_are_never_a_connection_source_so_probes_cannot_connect_to_themselves() -> None:
    """A client polling a server's port before it listens is given an ephemeral source
    port; were the server's port ephemeral too, the client could connect to itself and
    read back its own request (a benchmark once did, and failed on `GET /metrics`)."""
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert port not in ephemeral_ports()
        assert not port_open("127.0.0.1", port)
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
            server.listen()
            assert port_open("127.0.0.1", port)


def test_stack_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(
        EXFORGE_DATA_DIR=str(tmp_path / "data"),
        EXFORGE_EMBEDDED_KAFKA_PORT=str(free_port()),
        EXFORGE_CONFIG=str(tmp_path / "absent.toml"),
    )
    stack = Pipeline(env)
    try:
        up = stack.json("stack", "up")
        assert {name: part["healthy"] for name, part in up.items()} == {
            "broker": True,
            "store": True,
            "database": True,
        }
        pid = int((tmp_path / "data" / "run" / "broker.pid").read_text())
        assert process_alive(pid)

        status = stack.json("stack", "status")
        assert all(part["healthy"] and part["embedded"] for part in status.values())
        assert status["broker"]["detail"].startswith("metadata ok")
        assert status["store"]["detail"] == "put/get/delete ok"
        assert status["database"]["detail"] == "SELECT 1 ok"

        topics = stack.json("topics", "list")
        assert [t["topic"] for t in topics] == [f"exforge.{spec.name}" for spec in CATALOGUE]
        assert all(t["partitions"] and t["partitions"] >= 1 for t in topics)

        doctor = stack.json("doctor")
        checks = {c["name"]: c for c in doctor["checks"]}
        assert checks["broker"]["ok"] and checks["elixir"]["ok"]
        assert checks["sandbox"]["ok"], checks["sandbox"]
        assert checks["elixir"]["detail"].startswith("Elixir ")
        assert doctor["accelerator"]["device"] in ("cpu", "cuda")
        assert doctor["versions"]["faust-streaming"]
    finally:
        down = stack.cli("stack", "down")
    assert "stopped" in down.stdout
    assert not process_alive(pid)
    assert not (tmp_path / "data" / "run" / "broker.pid").exists()

    after = stack.cli("stack", "status", "--json", check=False)
    assert after.returncode == 1
    state = json.loads(after.stdout)
    assert not state["broker"]["healthy"] and state["store"]["healthy"]
    doctor_down = stack.cli("doctor", "--json", check=False)
    assert doctor_down.returncode == 1
    broker_check = next(
        c for c in json.loads(doctor_down.stdout)["checks"] if c["name"] == "broker"
    )
    assert not broker_check["ok"] and "exforge stack up" in broker_check["fix"]


def test_external_service_variables_start_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    # EXFORGE_KAFKA_BOOTSTRAP points at the shared broker: `stack up` must not start one.
    pipeline.json("stack", "up")
    assert not (Path(pipeline.env["EXFORGE_DATA_DIR"]) / "run" / "broker.pid").exists()
    assert "no embedded broker" in pipeline.cli("stack", "down").stdout


def test_a_record_from_a_plain_kafka_client_is_processed(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    request = upload_directory(open_store(settings), UNSEEN)
    # What a producer in any language writes: hand-made JSON, matching the schema.
    value = json.dumps(
        {
            "schema_version": 1,
            "source_id": "dir:external@1.0.0",
            "kind": "dir",
            "name": "external",
            "version": "1.0.0",
            "license": "Apache-2.0",
            "archive_key": request.archive_key,
            "sha256": request.sha256,
        }
    ).encode()

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                f"{settings.topic_prefix}sources.requests", value, key=b"dir:external@1.0.0"
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    pipeline.run_until_idle()
    stats = pipeline.json("dataset", "stats")
    expected = json.loads((UNSEEN / "EXPECTED.json").read_text())
    assert stats["packages"] == 1
    assert stats["samples"]["total"] == expected["documented_public_functions"]
    assert pipeline.json("dlq", "list") == []


def test_the_readme_producer_examples_send_valid_records() -> None:
    readme = (REPO / "README.md").read_text()
    kcat = next(line for line in readme.splitlines() if line.startswith("echo 'dir:"))
    key, value = kcat.removeprefix("echo '").split("' | kcat")[0].split("|", 1)
    request = SourceRequest.model_validate_json(value)
    assert request.source_id == key
    assert "-t exforge.sources.requests" in kcat and "-K'|'" in kcat
    assert "AIOKafkaProducer" in readme and '"exforge.sources.requests"' in readme


def child_commands(pid: int) -> list[list[str]]:
    commands = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):  # it ended meanwhile
            commands.append(child.cmdline())
    return commands


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_hex_scale_run_leaves_no_broker_or_worker(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """`benchmarks/hex_scale.py` stopped while its workers run takes its broker and
    workers with it (SIGTERM used to end it on the spot and leave both running)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    command = [sys.executable, "benchmarks/hex_scale.py", "--packages", "2"]
    bench = subprocess.Popen(
        [*command, "--work-dir", str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    started: dict[int, int] = {}  # pidfd → pid, open before the signal (pids get reused)
    try:
        deadline = time.monotonic() + 120
        while not any("worker" in command for command in child_commands(bench.pid)):
            assert bench.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.05)
        # the broker, up before the workers, and the workers
        started = pidfds({child.pid for child in psutil.Process(bench.pid).children(True)})
        (pid_file,) = tmp_path.glob("hex-scale-*/run/run/broker.pid")
        assert int(pid_file.read_text()) in started.values()
        bench.send_signal(signum)
        assert bench.wait(timeout=90) != 0
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert still_running(started, CLI_TIMEOUT_S) == [], "the broker or a worker outlived it"
    assert not list(tmp_path.glob("hex-scale-*"))  # its run directory is gone too
