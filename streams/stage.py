"""What every stage agent shares: per-message processing, delivery, dead letters, metrics.

A stage is a *handler*: a plain function from one message (value bytes, key) to a
`Result` (records to produce, per-item failures). Handlers do the transformation and
their own idempotent effects (store, ledger); the agent loop around them here does the
Kafka side: it waits until every output is acknowledged by the broker before the input
counts as processed, and turns any failure into a `DeadLetter` instead of stopping.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import faust
from pydantic import ValidationError
from sqlalchemy import Engine

from exforge.core import tracing
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from exforge.core.telemetry import DLQ_MESSAGES, DROPPED, MESSAGES_IN, MESSAGES_OUT, STAGE_LATENCY
from schemas.catalogue import topic_name
from schemas.records import DeadLetter, Record

log = logging.getLogger("exforge.stage")


class BadMessage(Exception):
    """The message itself is wrong (bad schema, bad checksum, corrupt archive…)."""


@dataclass(frozen=True)
class Output:
    topic: str  # catalogue name, e.g. "raw.packages"
    key: str
    record: Record
    # the trace this output continues (a W3C traceparent); None: the message being handled
    trace: str | None = None


@dataclass(frozen=True)
class Failure:
    """One item of a message that could not be processed (the whole message, or a part)."""

    error_class: str
    message: str
    detail: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException, **detail: str) -> Failure:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            message = (
                f"schema validation failed ({exc.error_count()} errors): {where}: {first['msg']}"
            )
        else:
            message = str(exc) or exc.__class__.__name__
        return cls(exc.__class__.__name__, message[:2000], detail)


@dataclass
class Result:
    outputs: list[Output] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count (stats, metrics)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# Plain handlers run in a thread (store and database I/O must not stall the consumer);
# async ones run on the loop, for those that touch Faust tables.
Handler = Callable[[bytes, str | None], Result | Awaitable[Result]]


@dataclass
class StageContext:
    """Everything a stage needs, built once per worker."""

    settings: Settings
    store: ObjectStore
    engine: Engine
    app: faust.App
    topics: dict[str, faust.TopicT] = field(default_factory=dict)
    last_activity: dict[str, float] = field(default_factory=dict)
    # Stages holding work back (near-dup batches) say so here; the worker is not idle
    # while any of these returns True.
    busy: list[Callable[[], bool]] = field(default_factory=list)

    def topic(self, name: str) -> faust.TopicT:
        if name not in self.topics:
            self.topics[name] = self.app.topic(
                topic_name(self.settings.topic_prefix, name),
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                allow_empty=True,
            )
        return self.topics[name]

    def touch(self, stage: str) -> None:
        self.last_activity[stage] = time.monotonic()

    async def send(self, stage: str, output: Output) -> None:
        """Produce and wait for the broker's acknowledgement (at-least-once)."""
        pending = await self.topic(output.topic).send(
            key=output.key.encode(),
            value=output.record.to_bytes(),
            headers=tracing.kafka_headers(output.trace),
        )
        await pending
        MESSAGES_OUT.labels(stage, output.topic).inc()

    async def dead_letter(
        self, stage: str, message: Any, failure: Failure, key: str | None
    ) -> None:
        """Keep the original bytes in the store and describe the failure on the DLQ."""
        value: bytes = message.value or b""
        payload_ref = await asyncio.to_thread(
            self.store.put_content_addressed, "dlq/payloads", value
        )
        letter = DeadLetter(
            stage=stage,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=key,
            error_class=failure.error_class,
            error_message=failure.message,
            payload_ref=payload_ref,
            payload_sha256=sha256_hex(value),
            detail=failure.detail,
        )
        await self.send(stage, Output("dlq", key or "", letter))
        DLQ_MESSAGES.labels(stage, failure.error_class).inc()
        log.warning(
            "%s: dead letter %s:%d:%d %s: %s",
            stage,
            message.topic,
            message.partition,
            message.offset,
            failure.error_class,
            failure.message,
        )


async def process(ctx: StageContext, stage: str, event: faust.EventT, handler: Handler) -> None:
    """Run one message through a handler, in a span of the message's trace; never raises
    for a bad message."""
    message = event.message
    attributes = {
        "messaging.system": "kafka",
        "messaging.destination.name": message.topic,
        "messaging.kafka.destination.partition": message.partition,
        "messaging.kafka.message.offset": message.offset,
    }
    with tracing.consumed(f"{stage} process", message.headers, attributes):
        await _process(ctx, stage, message, handler)


async def _process(ctx: StageContext, stage: str, message: Any, handler: Handler) -> None:
    started = time.perf_counter()
    ctx.touch(stage)
    MESSAGES_IN.labels(stage).inc()
    key = message.key.decode(errors="replace") if message.key else None
    try:
        if inspect.iscoroutinefunction(handler):
            result = await handler(message.value or b"", key)
        else:
            result = await asyncio.to_thread(handler, message.value or b"", key)
    except Exception as exc:  # any failure of one message goes to the DLQ, the stage goes on
        if not isinstance(exc, BadMessage | ValidationError | ValueError | KeyError):
            log.exception("%s: unexpected failure", stage)
        result = Result(failures=[Failure.from_exception(exc)])
    for output in result.outputs:
        await ctx.send(stage, output)
    for failure in result.failures:
        await ctx.dead_letter(stage, message, failure, key)
    for reason, count in result.dropped.items():
        DROPPED.labels(stage, reason).inc(count)
    STAGE_LATENCY.labels(stage).observe(time.perf_counter() - started)
    ctx.touch(stage)


def attach_stage(
    ctx: StageContext,
    stage: str,
    source: str,
    handler: Handler,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Define the Faust agent `stage` that runs `handler` on every message of `source`
    (and `after`, if given, once each message is done)."""

    async def agent(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await process(ctx, stage, event, handler)
            if after is not None:
                await after()
            ctx.app.consumer.mark_handled(event.message)

    ctx.app.agent(ctx.topic(source), name=stage)(agent)
