"""The database on SQLite and on a real PostgreSQL: the migrations build exactly the schema
the models declare and keep rows through every step (0010 fills in the histograms of
shards sealed before it); two workers that migrate a new database and seal shards at the
same moment (row locks), and two runs registering versions at once, each leave a
consistent ledger."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.orm import Session

from exforge.core.db import ApiKey, Base, Sample, Shard, alembic_config, engine_for
from exforge.core.store import FileStore
from exforge.llm.registry import list_versions, register_version
from schemas.records import InstructionSample
from schemas.shards import decode_shard
from serving import keys, usage
from streams.shard import manifest, pending_samples, seal, stage_sample
from tests.support.records import make_sample

SHARD_SIZE = 7
SAMPLES = 240
BARRIER_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 120
LOCKED_FOR_S = 1.0
USAGE_RECORDS = 40


def test_migrations_build_the_schema_the_models_declare(database_url: str) -> None:
    engine = engine_for(database_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrations_keep_rows_through_each_step_and_downgrade_to_nothing(
    database_url: str,
) -> None:
    config = alembic_config(database_url)
    command.upgrade(config, "0004")
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO samples (sample_id, dataset, stage, split, kind, payload, "
                "shard_index, recorded_at) VALUES ('s1', 'ds', 1, 'train', 'fim', '{}', NULL, "
                "CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO file_outcomes (source_id, path, sha256, kept, reason, recorded_at) "
                "VALUES ('dir:a@1', 'lib/a.ex', NULL, false, 'too_short', CURRENT_TIMESTAMP)"
            )
        )
    command.upgrade(config, "head")
    with engine.connect() as connection:
        sample = connection.execute(
            text("SELECT kind, difficulty, tokens, license FROM samples")
        ).one()
        outcome = connection.execute(text("SELECT reason, redactions FROM file_outcomes")).one()
    assert tuple(sample) == ("fim", 1, 0, None), "new columns take their server defaults"
    assert tuple(outcome) == ("too_short", None)

    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    assert {"samples", "shards", "model_versions", "api_keys"} <= set(
        inspect(engine).get_table_names()
    )
    engine.dispose()


def test_migration_0010_fills_sealed_shards_histograms_as_sealing_records_them(
    database_url: str, tmp_path: Path
) -> None:
    engine = engine_for(database_url)
    store = FileStore(tmp_path / "store")
    # two stages (groups), mixed kinds and difficulties: counts must land per shard
    kinds = ("fim", "explain", "test")
    for i in range(SAMPLES):
        sample = make_sample(i, stage=1 + i % 2, kind=kinds[i % 3], difficulty=1 + i % 5)
        stage_sample(engine, "ds", sample)
    assert seal(engine, store, "ds", SHARD_SIZE, flush=True) > 2
    with Session(engine) as session:
        groups = session.execute(select(Shard.stage, Shard.split).distinct()).all()
        recorded = {s.id: (s.difficulties, s.kinds) for s in session.scalars(select(Shard))}
    manifests = {group: manifest(engine, "ds", *group) for group in groups}
    engine.dispose()

    config = alembic_config(database_url)
    command.downgrade(config, "0009")  # the shard rows of an older ledger: no histograms
    assert "kinds" not in {c["name"] for c in inspect(engine).get_columns("shards")}
    command.upgrade(config, "head")
    with Session(engine) as session:
        filled = {s.id: (s.difficulties, s.kinds) for s in session.scalars(select(Shard))}
    assert filled == recorded
    assert {group: manifest(engine, "ds", *group) for group in groups} == manifests
    engine.dispose()


def _shard_worker(url: str, store_root: str, values: list[str], barrier: object) -> None:
    """One worker's shard stage: stage each delivered sample, seal full shards; flush last."""
    store = FileStore(Path(store_root))
    barrier.wait(BARRIER_TIMEOUT_S)  # type: ignore[attr-defined]
    engine = engine_for(url)  # both migrate the new database at once
    for value in values:
        stage_sample(engine, "ds", InstructionSample.model_validate_json(value))
        seal(engine, store, "ds", SHARD_SIZE, flush=False)
    seal(engine, store, "ds", SHARD_SIZE, flush=True)


def _run_concurrently(target: object, args: list[tuple[object, ...]]) -> None:
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(len(args))
    workers = [spawn.Process(target=target, args=(*a, barrier)) for a in args]  # type: ignore[arg-type]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOIN_TIMEOUT_S)
        if worker.is_alive():
            worker.kill()
            worker.join()
    assert [w.exitcode for w in workers] == [0] * len(workers)


def test_two_workers_sealing_at_once_put_every_sample_in_exactly_one_shard(
    database_url: str, tmp_path: Path
) -> None:
    samples = [make_sample(i, stage=1 + i % 2) for i in range(SAMPLES)]
    values = [s.model_dump_json(by_alias=True) for s in samples]
    # overlapping deliveries, in opposite orders: the middle third reaches both workers
    first, second = values[: 2 * SAMPLES // 3], values[SAMPLES // 3 :][::-1]
    store_root = str(tmp_path / "store")
    _run_concurrently(_shard_worker, [(database_url, store_root, v) for v in (first, second)])

    engine = engine_for(database_url)
    store = FileStore(Path(store_root))
    assert pending_samples(engine) == 0
    with Session(engine) as session:
        shards = session.scalars(select(Shard)).all()
        members = session.execute(
            select(Sample.stage, Sample.split, Sample.shard_index, Sample.sample_id)
        ).all()
    in_objects: Counter[str] = Counter()
    for shard in shards:
        rows = decode_shard(store.get(shard.key))
        assert len(rows) == shard.samples
        ledger = {
            m.sample_id
            for m in members
            if (m.stage, m.split, m.shard_index) == (shard.stage, shard.split, shard.shard_index)
        }
        assert {row["id"] for row in rows} == ledger, f"{shard.key} differs from the ledger"
        in_objects.update(row["id"] for row in rows)
    assert set(in_objects) == {s.sample_id for s in samples}, "a sample was lost"
    assert max(in_objects.values()) == 1, "a sample is in two shards"
    groups = Counter((s.stage, s.split) for s in shards)
    for (stage, split), count in groups.items():
        indexes = sorted(s.shard_index for s in shards if (s.stage, s.split) == (stage, split))
        assert indexes == list(range(count)), f"stage {stage} {split}: gaps or repeats"


def _register_worker(url: str, run: str, barrier: object) -> None:
    barrier.wait(BARRIER_TIMEOUT_S)  # type: ignore[attr-defined]
    engine = engine_for(url)
    for step in range(5):
        register_version(engine, "m", "tiny", f"models/m/{run}-{step}", f"{run}-{step}", {})


def test_two_runs_registering_at_once_get_distinct_consecutive_versions(
    database_url: str,
) -> None:
    _run_concurrently(_register_worker, [(database_url, "a"), (database_url, "b")])
    versions = list_versions(engine_for(database_url), "m")
    assert sorted(v["version"] for v in versions) == list(range(1, 11))
    assert len({v["run_id"] for v in versions}) == 10


def test_a_worker_opening_a_new_sqlite_database_waits_while_another_holds_its_write_lock(
    tmp_path: Path,
) -> None:
    # SQLite answers BUSY at once, busy_timeout or not, to a connection converting a
    # database to WAL while another process holds the write lock of its rollback journal.
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE other_tool (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other_tool VALUES (1)")
    opened: list[Engine] = []
    opening = threading.Thread(target=lambda: opened.append(engine_for(f"sqlite:///{path}")))
    opening.start()
    opening.join(LOCKED_FOR_S)
    assert opening.is_alive(), "gave up while the write lock was held"
    holder.execute("COMMIT")
    holder.close()
    opening.join(JOIN_TIMEOUT_S)
    assert opened, "did not open the database once the lock was released"
    with opened[0].connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    opened[0].dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_is_really_postgres(database_url: str) -> None:
    engine = engine_for(database_url)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as connection:
        assert connection.execute(text("SHOW server_version")).scalar()


def _usage_worker(url: str, key_id: str, barrier: object) -> None:
    barrier.wait(BARRIER_TIMEOUT_S)  # type: ignore[attr-defined]
    engine = engine_for(url)
    for _ in range(USAGE_RECORDS):
        usage.record(engine, key_id, "m", 1, prompt=3, completion=5)


def test_api_keys_store_hashes_and_usage_counts_every_request_of_two_gateways(
    database_url: str,
) -> None:
    engine = engine_for(database_url)
    key_id, secret = keys.create_key(engine, "alice", ["generate"], rate_per_s=2.0, burst=4)
    with Session(engine) as session:
        stored = session.get(ApiKey, key_id)
        assert stored is not None and secret not in (stored.key_hash, stored.name)
    info = keys.lookup(engine, secret)
    assert info is not None and info.scopes == {"generate"} and info.burst == 4
    _run_concurrently(_usage_worker, [(database_url, key_id), (database_url, key_id)])
    [row] = usage.report(engine)
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        2 * USAGE_RECORDS,
        2 * 3 * USAGE_RECORDS,
        2 * 5 * USAGE_RECORDS,
    ), "no increment lost"
    assert keys.revoke(engine, key_id) and keys.lookup(engine, secret) is None
