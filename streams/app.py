"""The Faust app: one worker process runs any subset of the stage agents.

Tuned for the embedded broker and for batch use: the first rebalance happens within a
few seconds of start, offsets are committed every second, and tables live in memory
(recovered from their changelog topics on restart).
"""

from __future__ import annotations

from collections.abc import Sequence

import faust

from exforge.db import open_database
from exforge.settings import Settings
from exforge.store import open_store
from streams import ingest, instruct, parse, shard
from streams.stage import StageContext

# Stage name → module that attaches its agent(s). `parse` also runs the dedup agent.
STAGES = {"ingest": ingest, "parse": parse, "instruct": instruct, "shard": shard}


class CurrentGenerationEvent(faust.Event):
    """An event that marks its offset committable only while its consumer generation is
    current and the flow is on.

    During a rebalance Faust drops ("skips") buffered events of the previous generation
    and acknowledges them, and an event still being handled when the partitions were
    revoked is acknowledged when it finishes; a commit before the stream seeks back to
    the committed offset would then skip messages nobody handled. Refusing those acks
    makes them be fetched and handled again after the seek (effects are idempotent).
    """

    def ack(self) -> bool:
        app = self.app
        if self.message.generation_id != app.consumer_generation_id:
            return False
        if not app.flow_control.is_active():
            return False
        return super().ack()


def create_app(settings: Settings) -> faust.App:
    return faust.App(
        settings.worker_group,
        broker=f"kafka://{settings.bootstrap}",
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_rebalance_timeout=10.0,
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        stream_wait_empty=False,
        table_standby_replicas=0,
        web_enabled=False,
        producer_acks=-1,
        Event=CurrentGenerationEvent,
    )


def build(settings: Settings, stages: Sequence[str] = tuple(STAGES)) -> StageContext:
    """The app with the chosen stages attached, and the context they share."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    ctx = StageContext(
        settings=settings,
        store=open_store(settings),
        engine=open_database(settings),
        app=create_app(settings),
    )
    for name in stages:
        STAGES[name].attach(ctx)
    return ctx
