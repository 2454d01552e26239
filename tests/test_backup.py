"""Backups and the disaster drills, on SQLite and on PostgreSQL: (a) delete the database,
restore, and `dataset stats` and `models list` are as before; (c) a backup of an older
schema is migrated on restore; a restore reports missing and changed store objects and
refuses a database that is not empty; scheduled backups keep the newest N. Drill (b), the
broker's data lost and the pipeline re-driven with `exforge replay raw`, is
`test_replay.py`."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, make_url, select, text
from sqlalchemy.orm import Session

from exforge.core.backup import (
    BackupError,
    create_backup,
    due,
    list_backups,
    restore_backup,
    scheduled_tick,
)
from exforge.core.db import EvaluationResult, alembic_config, engine_for
from exforge.core.settings import Settings, load_settings
from exforge.core.store import FileStore, ObjectStore
from exforge.llm.registry import register_version
from serving import keys
from streams.shard import seal, stage_sample
from tests.conftest import EXFORGE, REPO
from tests.postgres import PostgresServer
from tests.support.records import make_sample


def environment(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(
        EXFORGE_DATA_DIR=str(tmp_path / "data"),
        EXFORGE_DATABASE_URL=database_url,
        EXFORGE_CONFIG=str(tmp_path / "absent.toml"),
        EXFORGE_DATASET="ds",
    )
    return env


def cli(env: dict[str, str], *args: str, code: int = 0) -> Any:
    result = subprocess.run(
        [EXFORGE, *args], env=env, capture_output=True, text=True, timeout=180, cwd=REPO
    )
    assert result.returncode == code, f"exforge {' '.join(args)}: {result.stderr[-3000:]}"
    return json.loads(result.stdout) if "--json" in args else result


def settings_of(env: dict[str, str]) -> Settings:
    return load_settings(
        data_dir=Path(env["EXFORGE_DATA_DIR"]), database_url=env["EXFORGE_DATABASE_URL"]
    )


def fill(settings: Settings, store: ObjectStore) -> None:
    """A ledger with sealed shards, a registry with versions and scores, an API key, and
    the archive and evaluation objects that go with them."""
    engine = engine_for(settings.resolved_database_url)
    for i in range(30):
        stage_sample(engine, "ds", make_sample(i, stage=1 + i % 2))
    assert seal(engine, store, "ds", 8, flush=True) > 0
    for run in ("r1", "r2"):
        register_version(
            engine, "m", "tiny", f"models/m/{run}/adapter.safetensors", run, {"loss": 1.5}
        )
        store.put(f"models/m/{run}/adapter.safetensors", run.encode() * 100)
    store.put("raw/dir/a/1.0.0/" + "0" * 64 + ".tar", b"archive")
    store.put("evals/m/1/builtin.json", b'{"pass@1": 0.5}')
    with Session(engine) as session, session.begin():
        session.add(
            EvaluationResult(
                model_name="m", version=1, benchmark="builtin", metric="pass@1", value=0.5
            )
        )
    keys.create_key(engine, "alice", ["generate"])


def delete_database(url: str, postgres: PostgresServer | None) -> None:
    """The disaster: the database is gone (an empty one stands in its place)."""
    engine_for.cache_clear()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{parsed.database}{suffix}").unlink(missing_ok=True)
        return
    assert postgres is not None and parsed.database
    postgres.drop_database(parsed.database)
    postgres.create_database(parsed.database)


def _postgres(request: pytest.FixtureRequest, url: str) -> PostgresServer | None:
    return request.getfixturevalue("postgres") if url.startswith("postgresql") else None


def test_drill_delete_the_database_then_restore_gives_identical_stats_and_models(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> None:
    env = environment(tmp_path, database_url)
    settings = settings_of(env)
    store = FileStore(settings.root / "store")
    fill(settings, store)
    stats = cli(env, "dataset", "stats", "--json")
    models = cli(env, "models", "list", "--json")
    assert stats["samples"]["total"] == 30 and len(models) == 2

    backup_id = cli(env, "backup", "create", "--json")["id"]
    [listed] = cli(env, "backup", "list", "--json")
    assert listed["id"] == backup_id and listed["api_keys"] == 1
    assert listed["objects"] == len(list(store.list("shards/"))) + 4

    delete_database(database_url, _postgres(request, database_url))
    restored = cli(env, "backup", "restore", backup_id, "--json")
    assert restored["complete"] and restored["missing"] == [] and restored["changed"] == []
    assert cli(env, "dataset", "stats", "--json") == stats
    assert cli(env, "models", "list", "--json") == models
    engine = engine_for(database_url)
    with Session(engine) as session:
        assert session.scalars(select(EvaluationResult.value)).all() == [0.5]
    manifest = json.loads(store.get(f"backups/{backup_id}/manifest.json"))
    [key] = manifest["api_keys"]
    assert key["name"] == "alice" and len(key["key_hash"]) == 64


def test_drill_a_backup_of_an_older_schema_is_migrated_on_restore(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> None:
    env = environment(tmp_path, database_url)
    Path(env["EXFORGE_DATA_DIR"]).mkdir(parents=True)
    command.upgrade(alembic_config(database_url), "0004")
    old = create_engine(database_url)
    with old.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO samples (sample_id, dataset, stage, split, kind, payload, "
                "shard_index, recorded_at) VALUES ('s1', 'ds', 1, 'train', 'fim', '{}', NULL, "
                "CURRENT_TIMESTAMP)"
            )
        )
    old.dispose()
    backup_id = cli(env, "backup", "create", "--json")["id"]
    assert cli(env, "backup", "list", "--json")[0]["revision"] == "0004", "backup migrates nothing"

    delete_database(database_url, _postgres(request, database_url))
    restored = cli(env, "backup", "restore", backup_id, "--json")
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert (restored["revision_before"], restored["revision_after"]) == ("0004", head)
    with create_engine(database_url).connect() as connection:
        row = connection.execute(text("SELECT kind, difficulty, tokens FROM samples")).one()
    assert tuple(row) == ("fim", 1, 0)


def test_restore_reports_missing_and_changed_objects_and_refuses_a_used_database(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'exforge.db'}"
    settings = load_settings(data_dir=tmp_path / "data", database_url=url)
    store = FileStore(tmp_path / "store")
    fill(settings, store)
    backup_id = create_backup(settings, store)["id"]
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(settings, store, backup_id)
    with pytest.raises(BackupError, match="no backup nope"):
        restore_backup(settings, store, "nope")
    manifest_key = f"backups/{backup_id}/manifest.json"
    manifest = json.loads(store.get(manifest_key))
    newer = {**manifest, "database": {**manifest["database"], "revision": "9999"}}
    store.put("backups/newer/manifest.json", json.dumps(newer).encode())
    with pytest.raises(BackupError, match="revision 9999, which this exforge does not know"):
        restore_backup(settings, store, "newer")
    store.delete("backups/newer/manifest.json")

    shards = sorted(k for k in store.list("shards/") if k.endswith(".zst"))
    store.delete(shards[0])
    store.put("models/m/r1/adapter.safetensors", b"tampered")
    delete_database(url, None)
    report = restore_backup(settings, store, backup_id)
    assert report.missing == [shards[0]]
    assert report.changed == ["models/m/r1/adapter.safetensors"]
    assert not report.complete

    env = environment(tmp_path, url)
    env["EXFORGE_DATA_DIR"] = str(tmp_path / "data")
    delete_database(url, None)
    result = cli(env, "backup", "restore", backup_id, code=1)  # the file store is elsewhere
    assert "no backup" in result.stderr


def test_scheduled_backups_come_when_due_and_keep_the_newest(
    tmp_path: Path, store: ObjectStore
) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'exforge.db'}"
    settings = load_settings(
        data_dir=tmp_path / "data", database_url=url, backup_interval_s=3600, backup_keep=2
    )
    engine_for(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ticks = [start + timedelta(minutes=m) for m in (0, 10, 60, 119, 120, 180)]
    created = [scheduled_tick(settings, store, now) for now in ticks]
    assert [c is not None for c in created] == [True, False, True, False, True, True]
    assert [b["id"] for b in list_backups(store)] == [created[4], created[5]]
    assert not [k for k in store.list("backups/") if k.split("/")[1] == created[0]]
    assert not due(start, start + timedelta(days=9), 0), "interval 0: off"
