"""What every stage agent shares: per-message processing, delivery, dead letters, metrics.

A stage is a *handler*: a plain function from one message (value bytes, key) to a
`Result` (records to produce, per-item failures), or a *batch handler* from several
messages to one `Result` each. Handlers do the transformation and their own idempotent
effects (store, ledger); the agent loop around them here does the Kafka side: it turns
any failure into a `DeadLetter` instead of stopping, and counts a message as processed
(its offset may be committed) only once every output is acknowledged by the broker.

Delivery is pipelined: the loop hands a message's outputs to the producer and goes on
to the next message while the broker acknowledges them (up to `MAX_IN_FLIGHT` messages
per agent), so a message with many outputs costs one round trip, not one per output,
and the broker's acknowledgements of one message overlap the work on the next.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import faust
from pydantic import ValidationError
from sqlalchemy import Engine

from exforge.core import tracing
from exforge.core.kafka import BrokerWatch
from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from exforge.core.telemetry import (
    DLQ_MESSAGES,
    DROPPED,
    ITEMS,
    MESSAGES_IN,
    MESSAGES_OUT,
    STAGE_LATENCY,
    STAGE_WAIT,
)
from schemas.catalogue import topic_name
from schemas.records import DeadLetter, Record
from streams import tables

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
    partition: int | None = None  # None: the partition of the key


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
    # items handled, by unit ("files", "samples"…): the stage's rates on dashboards
    items: dict[str, int] = field(default_factory=dict)
    # run once every output is acknowledged, before the input counts as handled
    delivered: list[Callable[[], None]] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def count(self, unit: str, n: int = 1) -> None:
        self.items[unit] = self.items.get(unit, 0) + n


# Plain handlers run in a thread (store and database I/O must not stall the consumer);
# async ones run on the loop, for those that touch Faust tables.
Handler = Callable[[bytes, str | None], Result | Awaitable[Result]]
# A batch handler gets (value, key) of several messages and returns a Result for each,
# in order; it runs in a thread.
BatchHandler = Callable[[list[tuple[bytes, str | None]]], list[Result]]

MAX_IN_FLIGHT = 256  # messages per agent whose outputs await acknowledgement


@dataclass
class Activity:
    """When each stage of a worker last worked, and which are at work now. A stage in
    the middle of a long batch is not quiet: its input partitions commit nothing until
    the batch is delivered, and a quiet worker fetches such partitions again (a stall),
    which would hand the batch's messages to the stage a second time."""

    last: dict[str, float] = field(default_factory=dict)
    working: Counter[str] = field(default_factory=Counter)

    def touch(self, stage: str) -> None:
        self.last[stage] = time.monotonic()

    @contextmanager
    def during(self, stage: str) -> Iterator[None]:
        """`stage` is at work for the duration."""
        self.touch(stage)
        self.working[stage] += 1
        try:
            yield
        finally:
            self.working[stage] -= 1
            self.touch(stage)

    def at_work(self, stages: Collection[str] | None = None) -> bool:
        """Whether a stage (of `stages`; None: any) is at work."""
        return any(
            count > 0 for stage, count in self.working.items() if stages is None or stage in stages
        )

    def quiet_for(self, now: float, since: float) -> float:
        """Seconds no stage has worked (none yet: since `since`); 0 while one works."""
        if self.at_work():
            return 0.0
        return now - max(self.last.values(), default=since)


@dataclass
class StageContext:
    """Everything a stage needs, built once per worker."""

    settings: Settings
    store: ObjectStore
    engine: Engine
    app: faust.App
    broker: BrokerWatch  # the process's looks at lag and drained inputs
    topics: dict[str, faust.TopicT] = field(default_factory=dict)
    activity: Activity = field(default_factory=Activity)
    # Stages holding work back (near-dup batches) say so here; the worker is not idle
    # while any of these returns True.
    busy: list[Callable[[], bool]] = field(default_factory=list)
    # deliveries not yet acknowledged, per stage
    in_flight: dict[str, set[asyncio.Task[None]]] = field(default_factory=dict)
    # items handled by this process, per (stage, unit): the progress log
    items: dict[tuple[str, str], int] = field(default_factory=dict)

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

    def table(self, name: str) -> tables.BudgetedTable:
        """A Faust table of str → str, partitioned like the topics, in the store the
        settings choose (RocksDB within the process's `table_cache_mb`)."""
        rocksdb = self.settings.table_store == "rocksdb"
        return tables.table(
            self.app,
            name,
            self.settings.topic_partitions,
            self.settings.table_cache_mb if rocksdb else None,
        )

    async def produce(self, stage: str, output: Output) -> Awaitable[None]:
        """Hand one output to the producer; the returned awaitable ends once the broker
        has acknowledged it. The bytes go to the app's producer itself, not through
        `Topic.send`: its channel, pending-message and callback layers around the same
        producer call cost as much CPU as the call (a worker produces a record per sample)."""
        producer = await self.app.maybe_start_producer()
        pending = await producer.send(
            topic_name(self.settings.topic_prefix, output.topic),
            output.key.encode(),
            output.record.to_bytes(),
            partition=output.partition,
            timestamp=None,
            headers=tracing.kafka_headers(output.trace),
        )

        async def acknowledged() -> None:
            await pending
            MESSAGES_OUT.labels(stage, output.topic).inc()

        return acknowledged()

    async def send(self, stage: str, output: Output) -> None:
        """Produce and wait for the broker's acknowledgement (at-least-once)."""
        await (await self.produce(stage, output))

    def busy_delivering(self, stages: Collection[str] | None = None) -> bool:
        """Whether a stage (of `stages`; None: any) awaits acknowledgements."""
        return any(
            tasks for stage, tasks in self.in_flight.items() if stages is None or stage in stages
        )

    def holding_input(self, stages: Collection[str] | None = None) -> bool:
        """Whether a stage (of `stages`; None: any) holds input it has not committed: at
        work on it, or delivering its outputs."""
        return self.activity.at_work(stages) or self.busy_delivering(stages)

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


def _key(message: Any) -> str | None:
    return message.key.decode(errors="replace") if message.key else None


def _failed(stage: str, exc: Exception) -> Result:
    """Any failure of one message goes to the DLQ; the stage goes on."""
    if not isinstance(exc, BadMessage | ValidationError | ValueError | KeyError):
        log.error("%s: unexpected failure", stage, exc_info=exc)
    return Result(failures=[Failure.from_exception(exc)])


async def run_handler(stage: str, handler: Handler, message: Any) -> Result:
    try:
        if inspect.iscoroutinefunction(handler):
            return await handler(message.value or b"", _key(message))
        return await asyncio.to_thread(handler, message.value or b"", _key(message))
    except Exception as exc:
        return _failed(stage, exc)


async def run_batch(stage: str, handler: BatchHandler, messages: list[Any]) -> list[Result]:
    items = [(message.value or b"", _key(message)) for message in messages]
    try:
        results = await asyncio.to_thread(handler, items)
    except Exception as exc:  # the batch failed as a whole: retry each message alone
        log.warning("%s: batch of %d failed (%s); retrying one by one", stage, len(items), exc)
        results = []
        for item in items:
            try:
                (result,) = await asyncio.to_thread(handler, [item])
            except Exception as one:
                result = _failed(stage, one)
            results.append(result)
    assert len(results) == len(items), f"{stage}: {len(results)} results for {len(items)}"
    return results


async def deliver(ctx: StageContext, stage: str, message: Any, result: Result) -> None:
    """Produce a message's outputs and dead letters; once the broker has acknowledged
    all of them, run its `delivered` callbacks and mark it handled. Returns as soon as
    the outputs are handed to the producer (at most `MAX_IN_FLIGHT` messages wait)."""
    acks = [await ctx.produce(stage, output) for output in result.outputs]
    ctx.app.consumer.mark_delivering(message)  # no later message is handled before this
    for reason, count in result.dropped.items():
        DROPPED.labels(stage, reason).inc(count)
    for unit, count in result.items.items():
        ITEMS.labels(stage, unit).inc(count)
        ctx.items[stage, unit] = ctx.items.get((stage, unit), 0) + count
    in_flight = ctx.in_flight.setdefault(stage, set())
    while len(in_flight) >= MAX_IN_FLIGHT:
        await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)

    async def confirm() -> None:
        try:
            await asyncio.gather(*acks)
            for failure in result.failures:
                await ctx.dead_letter(stage, message, failure, _key(message))
        except Exception as exc:  # not marked handled: consumed again after a rewind
            log.error(
                "%s: outputs of %s:%d:%d not acknowledged (%s); it will be processed again",
                stage,
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            ctx.app.consumer.mark_abandoned(message)
            return
        for callback in result.delivered:
            callback()
        ctx.app.consumer.mark_handled(message)

    task = asyncio.ensure_future(confirm())
    in_flight.add(task)
    task.add_done_callback(in_flight.discard)


def consumed(stage: str, message: Any) -> AbstractContextManager[Any]:
    """The span of one message, in the trace its headers carry."""
    attributes = {
        "messaging.system": "kafka",
        "messaging.destination.name": message.topic,
        "messaging.kafka.destination.partition": message.partition,
        "messaging.kafka.message.offset": message.offset,
    }
    return tracing.consumed(f"{stage} process", message.headers, attributes)


def attach_stage(ctx: StageContext, stage: str, source: str, handler: Handler) -> None:
    """Define the Faust agent `stage` that runs `handler` on every message of `source`,
    each in a span of the message's trace."""

    async def agent(stream: faust.StreamT) -> None:
        waited_since = time.perf_counter()
        async for event in stream.events():
            started = time.perf_counter()
            STAGE_WAIT.labels(stage).inc(started - waited_since)
            MESSAGES_IN.labels(stage).inc()
            with ctx.activity.during(stage), consumed(stage, event.message):
                result = await run_handler(stage, handler, event.message)
                await deliver(ctx, stage, event.message, result)
            waited_since = time.perf_counter()
            STAGE_LATENCY.labels(stage).observe(waited_since - started)

    ctx.app.agent(ctx.topic(source), name=stage)(agent)


def attach_batch_stage(
    ctx: StageContext,
    stage: str,
    source: str,
    handler: BatchHandler,
    max_batch: int,
    within_s: float = 0.2,
) -> None:
    """Define the Faust agent `stage` that runs `handler` on up to `max_batch` messages
    of `source` at a time (those that arrived within `within_s` of the first). Each
    message's outputs are produced in a span of its trace (the batch's work is shared,
    so the span covers the delivery only)."""

    async def agent(stream: faust.StreamT) -> None:
        waited_since = time.perf_counter()
        async for events in stream.take_events(max_batch, within=within_s):
            started = time.perf_counter()
            STAGE_WAIT.labels(stage).inc(started - waited_since)
            MESSAGES_IN.labels(stage).inc(len(events))
            messages = [event.message for event in events]
            with ctx.activity.during(stage):
                results = await run_batch(stage, handler, messages)
                for message, result in zip(messages, results, strict=True):
                    with consumed(stage, message):
                        await deliver(ctx, stage, message, result)
            waited_since = time.perf_counter()
            STAGE_LATENCY.labels(stage).observe(waited_since - started)

    ctx.app.agent(ctx.topic(source), name=stage)(agent)
