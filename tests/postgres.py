"""A real PostgreSQL for the tests: Debian's `postgresql` package (`make test` installs it),
a throwaway cluster in a temp dir, listening on a free loopback port.

PostgreSQL refuses to run as root; as root (CI) the cluster belongs to the `postgres`
user that the package creates, and initdb/pg_ctl run as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from exforge.core.backup import postgres_program

SERVER_USER = "postgres"
SUPERUSER = "exforge"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(sql)

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run_as(user: pwd.struct_passwd | None) -> dict[str, object]:
    """subprocess arguments that run a program as `user` (None: as we are)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextmanager
def running_postgres(port: int) -> Iterator[PostgresServer]:
    """Start a fresh cluster on 127.0.0.1:`port`; stop it and delete it on exit."""
    programs = Path(postgres_program("initdb")).parent
    user = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="exforge-pg-"))
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    data, log = base / "data", base / "server.log"
    as_user = _run_as(user)
    subprocess.run(
        [
            str(programs / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        **as_user,  # type: ignore[arg-type]
    )
    # fsync off: a test cluster needs no durability; the socket stays in the temp dir
    options = f"-h 127.0.0.1 -p {port} -k {base} -F"
    pg_ctl = [str(programs / "pg_ctl"), "-D", str(data), "-l", str(log)]
    started = subprocess.run(
        [*pg_ctl, "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start"],
        capture_output=True,
        text=True,
        **as_user,  # type: ignore[arg-type]
    )
    try:
        if started.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{server_log}")
        yield PostgresServer("127.0.0.1", port)
    finally:
        subprocess.run(
            [*pg_ctl, "-m", "fast", "-w", "stop"],
            capture_output=True,
            **as_user,  # type: ignore[arg-type]
        )
        shutil.rmtree(base, ignore_errors=True)
