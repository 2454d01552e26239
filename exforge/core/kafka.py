"""Kafka plumbing shared by the CLI and the worker: topics, producing, reading, lag."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from exforge.core import tracing
from exforge.core.settings import Settings
from schemas.catalogue import CATALOGUE, STAGE_INPUTS, topic_name
from schemas.records import Record

log = logging.getLogger("exforge.kafka")

CLIENT_ID = "exforge"
REQUEST_TIMEOUT_MS = 15_000


@asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap,
        client_id=CLIENT_ID,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


@asynccontextmanager
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    # Tansu rejects InitProducerId, so idempotence stays off; effects are idempotent instead.
    client = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap,
        client_id=CLIENT_ID,
        enable_idempotence=False,
        acks="all",
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    try:
        await client.start()
        yield client
    finally:
        await client.stop()


async def produce(
    settings: Settings, topic: str, items: Iterable[tuple[str, Record | bytes]]
) -> int:
    """Send (key, record) pairs to a catalogue topic and wait until the broker has them."""
    count = 0
    name = topic_name(settings.topic_prefix, topic)
    async with producer(settings) as client:
        for key, value in items:
            data = value if isinstance(value, bytes) else value.to_bytes()
            with tracing.produced(name, key):  # each message starts its own trace
                headers = tracing.kafka_headers()
                await client.send_and_wait(name, data, key=key.encode(), headers=headers)
            count += 1
    return count


async def create_topics(settings: Settings) -> list[str]:
    """Create the catalogue topics that are missing; return the names created."""
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                topic_name(settings.topic_prefix, spec),
                spec.partitions or settings.topic_partitions,
                1,
                topic_configs={"cleanup.policy": spec.cleanup_policy},
            )
            for spec in CATALOGUE
            if topic_name(settings.topic_prefix, spec) not in existing
        ]
        if missing:
            response = await admin.create_topics(missing)
            errors = [
                f"{name}: {message or code}"
                for name, code, message in response.topic_errors
                if code not in (0, 36)  # 36: TOPIC_ALREADY_EXISTS (a racing creator)
            ]
            if errors:
                raise RuntimeError("could not create topics: " + "; ".join(errors))
        return [topic.name for topic in missing]


async def list_topics(settings: Settings) -> dict[str, int]:
    """Topic name → partition count, for the topics under the configured prefix."""
    async with metadata_consumer(settings) as consumer:
        return {
            topic: len(consumer.partitions_for_topic(topic) or ())
            for topic in sorted(await consumer.topics())
            if topic.startswith(settings.topic_prefix)
        }


@asynccontextmanager
async def metadata_consumer(settings: Settings) -> AsyncIterator[AIOKafkaConsumer]:
    async with bootstrap_consumer(settings.bootstrap) as consumer:
        yield consumer


@asynccontextmanager
async def bootstrap_consumer(bootstrap: str) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer of no group on `bootstrap` (host:port,…), stopped after."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        client_id=CLIENT_ID,
        enable_auto_commit=False,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    try:
        yield consumer
    finally:
        await consumer.stop()


PROBE_TIMEOUT_MS = 2000


async def end_offsets(
    consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The end offset of each partition: one past its last record.

    The embedded broker (Tansu 0.6.0) answers ListOffsets with the base offset of a
    partition's last record batch plus one, short of that batch's other records (three
    records produced in one batch at offsets 0-2 give end offset 1). So the record
    before the reported end is fetched as well: the broker returns its whole batch, and
    the end is one past the last record in it. On Kafka that record is the last one and
    the reported end stands. `consumer` must belong to no group (it is assigned here)."""
    ends: dict[TopicPartition, int] = dict(await consumer.end_offsets(partitions))
    probe = {tp for tp, end in ends.items() if end > 0}
    if not probe:
        return ends
    consumer.assign(sorted(probe))
    for tp in probe:
        consumer.seek(tp, ends[tp] - 1)
    deadline = asyncio.get_running_loop().time() + PROBE_TIMEOUT_MS / 1000
    while probe:
        left_ms = int((deadline - asyncio.get_running_loop().time()) * 1000)
        if left_ms <= 0:
            break  # e.g. the record before the end was deleted: keep the reported end
        batch = await consumer.getmany(*probe, timeout_ms=left_ms)
        for tp, records in batch.items():
            if records:
                ends[tp] = max(ends[tp], records[-1].offset + 1)
                probe.discard(tp)
    consumer.assign([])
    return ends


async def read_all(settings: Settings, topic: str) -> list[ConsumerRecord]:
    """Every record of a catalogue topic, from the beginning to the current end."""
    name = topic_name(settings.topic_prefix, topic)
    async with metadata_consumer(settings) as consumer:
        partitions = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
        if not partitions:
            return []
        ends = await end_offsets(consumer, partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, messages in batch.items():
                records.extend(m for m in messages if m.offset < ends[tp])
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return sorted(records, key=lambda r: (r.partition, r.offset))


@dataclass(frozen=True)
class LagRow:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


async def consumer_lag(settings: Settings, groups: Iterable[str] | None = None) -> list[LagRow]:
    """Committed offset, end offset and lag per group/topic/partition of exforge topics."""
    async with admin_client(settings) as admin, metadata_consumer(settings) as consumer:
        if groups is None:
            listed = await admin.list_consumer_groups()
            groups = sorted(g for g, *_ in listed if g.startswith(settings.topic_prefix))
        topics = [t for t in await consumer.topics() if t.startswith(settings.topic_prefix)]
        partitions = [
            TopicPartition(t, p) for t in sorted(topics) for p in consumer.partitions_for_topic(t)
        ]
        ends = await end_offsets(consumer, partitions) if partitions else {}
        rows: list[LagRow] = []
        for group in groups:
            # The broker here answers OffsetFetch only with explicit partitions.
            offsets = await admin.list_consumer_group_offsets(group, partitions=partitions)
            for tp in partitions:
                meta = offsets.get(tp)
                committed = meta.offset if meta is not None and meta.offset >= 0 else None
                if committed is None and ends[tp] == 0:
                    continue
                if committed is None and not _group_reads(group, tp.topic, settings):
                    continue
                rows.append(LagRow(group, tp.topic, tp.partition, committed, ends[tp]))
        return rows


def _group_reads(group: str, topic: str, settings: Settings) -> bool:
    """Whether an uncommitted partition counts as lag for this group (the worker reads
    every stage input; other groups only what they committed on)."""
    return group == settings.worker_group and topic in {
        topic_name(settings.topic_prefix, name) for name in STAGE_INPUTS.values()
    }


async def ping(settings: Settings, timeout: float = 5.0) -> int:
    """A real Metadata request; returns the number of brokers."""

    async def _metadata() -> int:
        async with metadata_consumer(settings) as consumer:
            await consumer.topics()
            return len(consumer._client.cluster.brokers())

    return await asyncio.wait_for(_metadata(), timeout)


@dataclass(frozen=True)
class StageProgress:
    """One stage's input for a consumer group: its backlog, how fast the group consumes
    it, and when the messages waiting now will be consumed at that rate."""

    stage: str
    topic: str
    lag: int
    rate: float | None  # messages committed per second (None: one reading only)

    @property
    def eta_s(self) -> float | None:
        """Seconds until the backlog is consumed at the current rate (0: none left; None:
        not moving, or no rate)."""
        if self.lag <= 0:
            return 0.0
        if not self.rate:
            return None
        return self.lag / self.rate


def stage_progress(
    settings: Settings,
    now: Sequence[LagRow],
    before: Sequence[LagRow] = (),
    seconds: float = 0.0,
    group: str | None = None,
) -> list[StageProgress]:
    """Each stage input's lag for `group` (default: the worker group) from the rows of
    `consumer_lag`, and its consumption rate from an earlier reading `seconds` before."""
    group = group or settings.worker_group
    by_topic = {topic_name(settings.topic_prefix, t): s for s, t in STAGE_INPUTS.items()}

    def committed(rows: Sequence[LagRow]) -> dict[str, int]:
        totals: dict[str, int] = {}
        for row in rows:
            if row.group == group and row.topic in by_topic:
                totals[row.topic] = totals.get(row.topic, 0) + (row.committed or 0)
        return totals

    lags: dict[str, int] = {}
    for row in now:
        if row.group == group and row.topic in by_topic:
            lags[row.topic] = lags.get(row.topic, 0) + max(row.lag, 0)
    after, earlier = committed(now), committed(before)
    return [
        StageProgress(
            by_topic[topic],
            topic,
            lags[topic],
            (after[topic] - earlier.get(topic, 0)) / seconds if before and seconds > 0 else None,
        )
        for topic in sorted(lags, key=lambda t: list(by_topic).index(t))
    ]


def eta_text(seconds: float | None) -> str:
    """`3m05s`-style; `-` when unknown."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


async def drained(settings: Settings, topics: Iterable[str]) -> bool:
    """Whether every message of these catalogue topics is consumed and committed by the
    worker group.

    Committed offsets are read before end offsets: a message whose processing was
    committed before the first read had produced its outputs before that, so they
    show in the end offsets read after it.
    """
    names = {topic_name(settings.topic_prefix, topic) for topic in topics}
    async with admin_client(settings) as admin, metadata_consumer(settings) as consumer:
        present = [t for t in await consumer.topics() if t in names]
        partitions = [
            TopicPartition(t, p) for t in sorted(present) for p in consumer.partitions_for_topic(t)
        ]
        if not partitions:
            return True
        committed = await admin.list_consumer_group_offsets(
            settings.worker_group, partitions=partitions
        )
        ends = await end_offsets(consumer, partitions)
    for tp in partitions:
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        if ends[tp] > done:
            return False
    return True


# An await on the broker that a timer makes (a drain check, a shard publish) and that has
# not ended by then is abandoned and tried again on a later tick: the timer (shard
# sealing, near-dup decisions) would otherwise stop for good on one await that never ends.
ANSWER_TIMEOUT_S = 2 * REQUEST_TIMEOUT_MS / 1000


@dataclass
class DrainWatch:
    """Whether some stage inputs stayed drained (`drained`) over `checks` consecutive
    observations: a point at which the work that feeds a decision is complete."""

    settings: Settings
    topics: tuple[str, ...]
    checks: int = 2
    streak: int = 0
    timeout_s: float = ANSWER_TIMEOUT_S

    async def observe(self) -> bool:
        """Look once more; True once the inputs were drained `checks` times in a row."""
        try:
            check = drained(self.settings, self.topics)
            self.streak = self.streak + 1 if await asyncio.wait_for(check, self.timeout_s) else 0
        except TimeoutError:
            log.warning("drain check abandoned: no answer in %g s", self.timeout_s)
            self.streak = 0
        except Exception as exc:  # the broker may be restarting: look again next time
            log.warning("drain check failed: %s", exc)
            self.streak = 0
        return self.streak >= self.checks

    def reset(self) -> None:
        self.streak = 0
