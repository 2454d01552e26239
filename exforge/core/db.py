"""The ledger database (SQLAlchemy 2, Alembic migrations): what each stage has recorded.

Rows are keyed by content or by source position, so a redelivered message rewrites the
same row: counts stay exact under at-least-once delivery.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Date,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from exforge.core.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Package(Base):
    """A source archive the ingest stage verified and passed on."""

    __tablename__ = "packages"

    source_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(128))
    license: Mapped[str | None] = mapped_column(String(256))
    archive_key: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # the `raw.packages` record as sent (JSON), for `exforge replay raw`
    record: Mapped[str | None] = mapped_column(Text)


class FileOutcome(Base):
    """What became of one file of one package: kept, or dropped with a reason."""

    __tablename__ = "file_outcomes"

    source_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), primary_key=True)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    kept: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(64))
    # secrets and PII replaced in the file, by kind (None: dropped before redaction)
    redactions: Mapped[dict[str, int] | None] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Sample(Base):
    """An instruction sample staged for sharding; `shard_index` is set once sealed."""

    __tablename__ = "samples"
    # The pending samples (`shard_index` NULL) by age: the shard stage asks every second
    # for the oldest one, answered from this index alone. Without `recorded_at` in it,
    # SQLite read each pending row, and with it the sample's payload stored before
    # `recorded_at` (150 ms a question at 12,500 pending samples, 0.04 ms with it).
    __table_args__ = (Index("ix_samples_pending", "shard_index", "recorded_at"),)

    sample_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128))
    stage: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)
    shard_index: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    difficulty: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    license: Mapped[str | None] = mapped_column(String(256))
    source_id: Mapped[str | None] = mapped_column(String(512))
    position: Mapped[int | None] = mapped_column(Integer)


class SampleDrop(Base):
    """A generated sample the instruct stage dropped, with why (keyed by its id)."""

    __tablename__ = "sample_drops"

    sample_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(64))
    source_id: Mapped[str | None] = mapped_column(String(512))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Shard(Base):
    """A sealed shard; `published` once its `TrainingShard` event reached the broker.
    `difficulties` and `kinds` count its members by difficulty and kind (the manifest's
    histograms), recorded at sealing so a manifest reads shard rows, not samples."""

    __tablename__ = "shards"
    __table_args__ = (UniqueConstraint("dataset", "stage", "split", "shard_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(String(128))
    stage: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(16))
    shard_index: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1024))
    samples: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    published: Mapped[bool] = mapped_column(Boolean, default=False)
    sealed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    difficulties: Mapped[dict[str, int]] = mapped_column(JSON)
    kinds: Mapped[dict[str, int]] = mapped_column(JSON)


def upsert(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> None:
    """Insert `rows` into `model`'s table; where a row with the same primary key exists,
    set the columns the row gives instead (as `Session.merge` would, in one statement
    for all rows rather than a lookup and a write each). A key given twice keeps its
    last row (PostgreSQL refuses to update a row twice in one statement)."""
    if not rows:
        return
    keys = [column.name for column in inspect(model).primary_key]
    unique = list({tuple(row[k] for k in keys): row for row in rows}.values())
    statement: postgresql.Insert | sqlite.Insert = (
        postgresql.insert(model)
        if session.get_bind().dialect.name == "postgresql"
        else sqlite.insert(model)
    )
    updated = [name for name in unique[0] if name not in keys]
    session.execute(
        statement.on_conflict_do_update(
            index_elements=keys, set_={name: statement.excluded[name] for name in updated}
        ),
        unique,
    )


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


SQLITE_BUSY_TIMEOUT_S = 30
SQLITE_WAL_RETRY_S = 0.05


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")  # queues writers
    _enter_wal(cursor)
    cursor.close()


def _enter_wal(cursor: Any) -> None:
    """WAL lets readers go on while a worker writes. Converting a new database needs an
    exclusive lock, and SQLite answers BUSY at once, without waiting, when another
    process holds or wants the write lock (workers starting together): retry."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(SQLITE_WAL_RETRY_S)


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock up front: two workers sealing shards serialise
    # instead of both reading the same pending rows (PostgreSQL uses FOR UPDATE).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# Any constant shared by every exforge process: the key of PostgreSQL's advisory lock
# under which one process at a time migrates (workers starting together on a new database).
MIGRATION_LOCK_KEY = 0x6578666F


@cache
def engine_for(url: str) -> Engine:
    """One engine per URL per process, migrated to the latest schema."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # held to the end of this transaction; SQLite's BEGIN IMMEDIATE does the same
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return engine


def open_database(settings: Settings) -> Engine:
    return engine_for(settings.resolved_database_url)


class SeenRelease(Base):
    """A release a source crawler has already requested (or found retired), so a re-run
    skips it while its outer checksum is unchanged."""

    __tablename__ = "seen_releases"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    package: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    checksum: Mapped[str | None] = mapped_column(String(64))
    retired: Mapped[bool] = mapped_column(Boolean, default=False)
    retirement: Mapped[str | None] = mapped_column(String(512))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class HttpCacheEntry(Base):
    """The last ETag and body of a source API URL: an unchanged resource costs a 304."""

    __tablename__ = "http_cache"

    url: Mapped[str] = mapped_column(String(2048), primary_key=True)
    etag: Mapped[str] = mapped_column(String(512))
    body: Mapped[str] = mapped_column(Text)
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LicenseOutcome(Base):
    """The license decision for one source: allowed, or withheld with a reason."""

    __tablename__ = "license_outcomes"

    source_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    package: Mapped[str] = mapped_column(String(256), index=True)
    declared: Mapped[str | None] = mapped_column(String(512))
    spdx: Mapped[str | None] = mapped_column(String(256))
    allowed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TrainingRun(Base):
    """A training run: its configuration and where it stands."""

    __tablename__ = "training_runs"

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(512))
    config: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # running / finished / failed
    step: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RunCheckpoint(Base):
    """A checkpoint a run wrote to the store."""

    __tablename__ = "run_checkpoints"

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelVersion(Base):
    """A registered model version: integer version per name, a base model spec and the
    adapter in the store (none for a version whose base holds all its weights); a
    compressed version names its parent version, the method and its parameters."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(512))
    adapter_key: Mapped[str | None] = mapped_column(String(1024))
    run_id: Mapped[str | None] = mapped_column(String(128))
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16))  # registered/staging/production/retired
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str | None] = mapped_column(String(32))  # prune, distill, fuse, share
    parameters: Mapped[str | None] = mapped_column(Text)  # JSON


class EvaluationResult(Base):
    """One metric of one benchmark on one model version."""

    __tablename__ = "evaluation_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(256), index=True)
    version: Mapped[int] = mapped_column(Integer)
    benchmark: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# Serving: API keys, daily usage, rollouts and their history.


class ApiKey(Base):
    """A gateway API key: only its SHA-256 is stored; scopes are comma-separated."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    scopes: Mapped[str] = mapped_column(String(512))
    rate_per_s: Mapped[float | None] = mapped_column(Float)
    burst: Mapped[int | None] = mapped_column(Integer)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class UsageDaily(Base):
    """Tokens served per key, day, model and version."""

    __tablename__ = "usage_daily"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)


class Rollout(Base):
    """Which versions of a model serve: stable, and an optional canary with its share."""

    __tablename__ = "serving_rollouts"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    stable_version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer)
    canary_version: Mapped[int | None] = mapped_column(Integer)
    canary_percent: Mapped[float] = mapped_column(Float, default=0.0)
    sticky: Mapped[bool] = mapped_column(Boolean, default=True)
    steps: Mapped[str] = mapped_column(Text, default="[]")  # remaining percents, JSON
    step_interval_s: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RolloutEvent(Base):
    """History: promotions, splits, steps and (automatic) rollbacks."""

    __tablename__ = "serving_rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    action: Mapped[str] = mapped_column(String(32))
    version: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Anomaly(Base):
    """A signal (stage latency, throughput, lag growth, serving latency) of one subject
    and whether it departs from its baseline now (exforge.core.anomaly)."""

    __tablename__ = "anomalies"

    signal: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(512), primary_key=True)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    value: Mapped[float] = mapped_column(Float, default=0.0)
    baseline: Mapped[float] = mapped_column(Float, default=0.0)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    origin: Mapped[str] = mapped_column(String(256), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
