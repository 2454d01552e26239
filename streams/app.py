"""The Faust app: one worker process runs any subset of the stage agents.

Tuned for the embedded broker and for batch use: the first rebalance happens within a
few seconds of start, offsets are committed every second, and tables live in memory
(recovered from their changelog topics on restart) or, with `table_store = "rocksdb"`,
in RocksDB (through rocksdict) under the worker process's own data directory, within
one memory budget per process (`streams.tables`) so that a worker's memory does not grow
with the tables. What gets
committed is decided by `streams.offsets`: only offsets the agents marked handled,
never Faust's own acks.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import faust

from exforge.core.db import open_database
from exforge.core.kafka import BrokerWatch
from exforge.core.settings import Settings
from exforge.core.store import open_store
from streams import ingest, instruct, parse, shard
from streams.offsets import BrokerOffsets, HandledOffsetsConsumer, Rewinds, resolve
from streams.stage import StageContext

log = logging.getLogger("exforge.app")

# Stage name → module that attaches its agent(s). `parse` also runs the dedup agent.
STAGES = {"ingest": ingest, "parse": parse, "instruct": instruct, "shard": shard}


STREAM_BUFFER = 512
HEARTBEATS_PER_SESSION = 10  # a member misses several before the broker drops it
# lock files of the worker directories this process holds, open until it exits
_HELD_DIRS: list[IO[str]] = []


def worker_dir(settings: Settings, index: int) -> Path:
    """The data directory (tables) of worker process `index` of this machine: the first
    of `worker/<index>`, `worker/<index + 1>`, … that no other live process holds, so
    that workers started separately on one machine never open the same RocksDB files.
    The directory's lock is held until this process exits."""
    for slot in itertools.count(index):
        path = settings.root / "worker" / str(slot)
        path.mkdir(parents=True, exist_ok=True)
        lock = (path / "lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _HELD_DIRS.append(lock)
        return path
    raise AssertionError("unreachable")


def create_app(settings: Settings, index: int = 0) -> faust.App:
    app = faust.App(
        settings.worker_group,
        broker=f"kafka://{settings.bootstrap}",
        datadir=str(worker_dir(settings, index)),
        store="memory://" if settings.table_store == "memory" else "rocksdb://",
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5,
        broker_rebalance_timeout=10.0,
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=settings.kafka_session_timeout_s / HEARTBEATS_PER_SESSION,
        stream_wait_empty=False,
        # unprocessed messages an agent may hold: enough for its largest batch, and so
        # small that a backlog waits in the broker, not in the worker's memory
        stream_buffer_maxsize=STREAM_BUFFER,
        table_standby_replicas=0,
        web_enabled=False,
        producer_acks=-1,
        producer_linger=settings.producer_linger_ms / 1000,
        producer_max_batch_size=settings.producer_batch_bytes,
    )
    app.transport.Consumer = HandledOffsetsConsumer
    broker = BrokerOffsets(settings.bootstrap, settings.worker_group)

    rewinds = Rewinds()

    @app.timer(interval=1.0, name="offset-books")
    async def keep_offset_books() -> None:
        try:
            skipped = await resolve(app.consumer.progress, broker)
        except Exception as exc:  # retried next tick; meanwhile nothing is committed
            log.warning("offset bookkeeping: %s", exc)
            return
        if app.in_recovery or not app.flow_control.is_active():
            return  # the rebalance seeks to the committed offsets anyway
        for tp, base in skipped.items():
            if rewinds.due(tp, base, time.monotonic()):
                log.info("%s:%d: offset %d was skipped; fetching again", *tp, base)
                await app.consumer.seek(tp, base)

    @app.on_before_shutdown.connect
    async def close_broker(app: faust.App, **kwargs: object) -> None:
        await broker.stop()

    return app


def check_stages(stages: Sequence[str]) -> None:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")


def build(
    settings: Settings, stages: Sequence[str] = tuple(STAGES), index: int = 0
) -> StageContext:
    """The app of worker process `index` with the chosen stages attached, and the
    context they share."""
    check_stages(stages)
    ctx = StageContext(
        settings=settings,
        store=open_store(settings),
        engine=open_database(settings),
        app=create_app(settings, index),
        broker=BrokerWatch(settings.bootstrap),
    )

    @ctx.app.on_before_shutdown.connect
    async def close_watch(app: faust.App, **kwargs: object) -> None:
        await ctx.broker.close()

    for name in stages:
        STAGES[name].attach(ctx)
    return ctx
