"""Backups of the database, and of what the store holds, in the store under `backups/<id>/`.

A backup is a consistent snapshot of the ledger and registry database (SQLite: the online
backup API, while workers keep writing; PostgreSQL: `pg_dump`'s custom format, one
snapshot transaction) plus `manifest.json`: the schema revision, the API-key table
(hashes only, as stored) and every archive, shard, model and evaluation object of the
store with its sha256 and size. The manifest is written last, so a backup without one is
incomplete and not listed.

A restore needs an empty database (`EXFORGE_DATABASE_URL`, or the data dir's SQLite file):
it loads the snapshot, migrates it to this code's schema, and checks every manifest object
against the store, reporting what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, make_url, text

from exforge import __version__
from exforge.core.db import alembic_config, engine_for
from exforge.core.settings import Settings
from exforge.core.store import ObjectNotFound, ObjectStore, sha256_hex

PREFIX = "backups/"
# what a restore needs from the store besides the database: inputs and products
OBJECT_PREFIXES = ("raw/", "books/", "shards/", "models/", "evals/")
DEBIAN_POSTGRES = Path("/usr/lib/postgresql")
DUMP_NAMES = {"sqlite": "database.sqlite", "postgresql": "database.pgdump"}


class BackupError(RuntimeError):
    """A backup or restore that cannot go on; the message says why."""


@dataclass
class RestoreReport:
    id: str
    dialect: str
    revision_before: str | None
    revision_after: str | None
    objects: int
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.changed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def postgres_program(name: str) -> str:
    """A PostgreSQL client program: on PATH, else the newest of Debian's server versions."""
    on_path = shutil.which(name)
    if on_path:
        return on_path
    candidates = sorted(
        DEBIAN_POSTGRES.glob(f"*/bin/{name}"),
        key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0),
    )
    if not candidates:
        raise BackupError(f"{name} is not installed (Debian: the postgresql-client package)")
    return str(candidates[-1])


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URL without the password, and the environment that carries it."""
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    plain = parsed.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database:
        raise BackupError(f"not a SQLite file URL: {url}")
    return Path(database)


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed: {result.stderr.strip()[-2000:]}")


def dump_database(url: str, out: Path) -> None:
    """A consistent snapshot of the database at `url` into the file `out`."""
    dialect = make_url(url).get_backend_name()
    if dialect == "sqlite":
        source = sqlite3.connect(_sqlite_path(url))
        target = sqlite3.connect(out)
        try:
            source.backup(target)  # page by page; writers may go on meanwhile
        finally:
            target.close()
            source.close()
    elif dialect == "postgresql":
        conninfo, env = _libpq(url)
        dump = postgres_program("pg_dump")
        _run(
            [dump, "--format=custom", "--no-owner", "--no-privileges", "-f", str(out), conninfo],
            env,
        )
    else:
        raise BackupError(f"no backup method for {dialect} databases")


def load_database(url: str, dump: Path) -> None:
    """Load a snapshot into the (empty) database at `url`."""
    dialect = make_url(url).get_backend_name()
    if dialect == "sqlite":
        path = _sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        source, target = sqlite3.connect(dump), sqlite3.connect(path)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    else:
        conninfo, env = _libpq(url)
        restore = postgres_program("pg_restore")
        _run(
            [
                restore,
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "-d",
                conninfo,
                str(dump),
            ],
            env,
        )


def _plain_engine(url: str) -> Engine:
    """An engine that does not migrate (a backup records the schema as it is)."""
    return create_engine(url)


def schema_revision(engine: Engine) -> str | None:
    if "alembic_version" not in inspect(engine).get_table_names():
        return None
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def api_keys(engine: Engine) -> list[dict[str, Any]]:
    """The API-key table as stored: ids, SHA-256 hashes, names, scopes, limits."""
    if "api_keys" not in inspect(engine).get_table_names():
        return []
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_keys ORDER BY key_id")).mappings()
        return [
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()} for r in rows
        ]


def object_manifest(store: ObjectStore) -> list[dict[str, Any]]:
    """Every archive, shard, model and evaluation object with its sha256 and size."""
    entries = []
    for prefix in OBJECT_PREFIXES:
        for key in sorted(store.list(prefix)):
            data = store.get(key)
            entries.append({"key": key, "sha256": sha256_hex(data), "size": len(data)})
    return entries


def new_id(now: datetime) -> str:
    """Sortable by time; the microseconds keep two backups of one second apart."""
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def create_backup(
    settings: Settings, store: ObjectStore, now: datetime | None = None
) -> dict[str, Any]:
    """Snapshot the database and the store's manifest into `backups/<id>/`; the manifest."""
    url = settings.resolved_database_url
    dialect = make_url(url).get_backend_name()
    if dialect == "sqlite" and not _sqlite_path(url).exists():
        raise BackupError(f"no database at {url}")
    created = now or datetime.now(UTC)
    backup_id = new_id(created)
    engine = _plain_engine(url)
    try:
        revision, keys = schema_revision(engine), api_keys(engine)
    finally:
        engine.dispose()
    with tempfile.TemporaryDirectory(prefix="exforge-backup-") as tmp:
        dump = Path(tmp) / DUMP_NAMES[dialect]
        dump_database(url, dump)
        data = dump.read_bytes()
    database_key = f"{PREFIX}{backup_id}/{DUMP_NAMES[dialect]}"
    store.put(database_key, data)
    manifest = {
        "id": backup_id,
        "created_at": created.astimezone(UTC).isoformat(),
        "exforge_version": __version__,
        "database": {
            "dialect": dialect,
            "key": database_key,
            "sha256": sha256_hex(data),
            "size": len(data),
            "revision": revision,
        },
        "api_keys": keys,
        "objects": object_manifest(store),
    }
    store.put(f"{PREFIX}{backup_id}/manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(store: ObjectStore, backup_id: str) -> dict[str, Any]:
    try:
        return json.loads(store.get(f"{PREFIX}{backup_id}/manifest.json"))
    except ObjectNotFound:
        raise BackupError(f"no backup {backup_id} (exforge backup list shows them)") from None


def list_backups(store: ObjectStore) -> list[dict[str, Any]]:
    """Complete backups, oldest first, each as a summary of its manifest."""
    ids = sorted(
        key.removeprefix(PREFIX).removesuffix("/manifest.json")
        for key in store.list(PREFIX)
        if key.endswith("/manifest.json")
    )
    summaries = []
    for backup_id in ids:
        manifest = read_manifest(store, backup_id)
        summaries.append(
            {
                "id": backup_id,
                "created_at": manifest["created_at"],
                "dialect": manifest["database"]["dialect"],
                "revision": manifest["database"]["revision"],
                "database_bytes": manifest["database"]["size"],
                "objects": len(manifest["objects"]),
                "api_keys": len(manifest["api_keys"]),
            }
        )
    return summaries


def _is_empty(url: str) -> bool:
    if make_url(url).get_backend_name() == "sqlite" and not _sqlite_path(url).exists():
        return True
    engine = _plain_engine(url)
    try:
        return not inspect(engine).get_table_names()
    finally:
        engine.dispose()


def verify_objects(
    store: ObjectStore, objects: list[dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """(missing keys, keys whose content no longer has the recorded sha256)."""
    missing, changed = [], []
    for entry in objects:
        try:
            digest = hashlib.sha256(store.get(entry["key"])).hexdigest()
        except ObjectNotFound:
            missing.append(entry["key"])
            continue
        if digest != entry["sha256"]:
            changed.append(entry["key"])
    return missing, changed


def restore_backup(settings: Settings, store: ObjectStore, backup_id: str) -> RestoreReport:
    """Load backup `backup_id` into the empty database of the settings, migrate it to this
    code's schema, and check the store against the manifest."""
    manifest = read_manifest(store, backup_id)
    url = settings.resolved_database_url
    dialect = make_url(url).get_backend_name()
    recorded = manifest["database"]
    if recorded["dialect"] != dialect:
        raise BackupError(
            f"backup {backup_id} is of a {recorded['dialect']} database, not {dialect}"
        )
    known = {
        script.revision
        for script in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()
    }
    if recorded["revision"] is not None and recorded["revision"] not in known:
        raise BackupError(
            f"backup {backup_id} has schema revision {recorded['revision']}, which this "
            "exforge does not know: restore it with the exforge version that made it"
        )
    if not _is_empty(url):
        raise BackupError(f"the database at {make_url(url).render_as_string()} is not empty")
    data = store.get(recorded["key"])
    if sha256_hex(data) != recorded["sha256"]:
        raise BackupError(f"{recorded['key']} does not match its recorded sha256")
    with tempfile.TemporaryDirectory(prefix="exforge-restore-") as tmp:
        dump = Path(tmp) / DUMP_NAMES[dialect]
        dump.write_bytes(data)
        load_database(url, dump)
    engine_for.cache_clear()  # an engine opened before the restore knew an empty database
    engine = engine_for(url)  # migrates a snapshot of an older schema to this code's
    missing, changed = verify_objects(store, manifest["objects"])
    return RestoreReport(
        id=backup_id,
        dialect=dialect,
        revision_before=recorded["revision"],
        revision_after=schema_revision(engine),
        objects=len(manifest["objects"]),
        missing=missing,
        changed=changed,
    )


def prune(store: ObjectStore, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete backups (and any incomplete ones older
    than the oldest kept); returns the deleted ids."""
    ids = [b["id"] for b in list_backups(store)]
    doomed = ids[:-keep]
    kept = set(ids) - set(doomed)
    oldest_kept = min(kept) if kept else None
    for key in list(store.list(PREFIX)):
        backup_id = key.removeprefix(PREFIX).split("/", 1)[0]
        if backup_id in doomed or (
            backup_id not in kept and oldest_kept is not None and backup_id < oldest_kept
        ):
            store.delete(key)
    return doomed


def due(newest: datetime | None, now: datetime, interval_s: float) -> bool:
    """Whether a scheduled backup is due: scheduling is on and the newest is old enough."""
    if interval_s <= 0:
        return False
    return newest is None or now - newest >= timedelta(seconds=interval_s)


def scheduled_tick(settings: Settings, store: ObjectStore, now: datetime) -> str | None:
    """One step of the schedule: back up if due, then keep the newest `backup_keep`;
    returns the new backup's id (None: not due)."""
    backups = list_backups(store)
    newest = datetime.fromisoformat(backups[-1]["created_at"]) if backups else None
    if not due(newest, now, settings.backup_interval_s):
        return None
    manifest = create_backup(settings, store, now)
    prune(store, settings.backup_keep)
    return manifest["id"]
