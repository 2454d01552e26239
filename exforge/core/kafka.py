"""Kafka plumbing shared by the CLI and the worker: topics, producing, reading, lag."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from exforge.core import tracing
from exforge.core.settings import Settings
from schemas.catalogue import CATALOGUE, STAGE_INPUTS, topic_name
from schemas.records import Record

log = logging.getLogger("exforge.kafka")

CLIENT_ID = "exforge"
REQUEST_TIMEOUT_MS = 15_000


def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id=CLIENT_ID, request_timeout_ms=REQUEST_TIMEOUT_MS
    )


@asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = _admin(settings.bootstrap)
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
    consumer = await _started_consumer(bootstrap)
    try:
        yield consumer
    finally:
        await consumer.stop()


async def _started_consumer(bootstrap: str) -> AIOKafkaConsumer:
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
    return consumer


PROBE_TIMEOUT_MS = 2000


# partition → (end the broker reported, end found by fetching the record before it)
KnownEnds = dict[TopicPartition, tuple[int, int]]


async def end_offsets(
    consumer: AIOKafkaConsumer,
    partitions: list[TopicPartition],
    known: KnownEnds | None = None,
    past: Mapping[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """The end offset of each partition: one past its last record.

    The embedded broker (Tansu 0.6.0) answers ListOffsets with the base offset of a
    partition's last record batch plus one, short of that batch's other records (three
    records produced in one batch at offsets 0-2 give end offset 1). So the record
    before the reported end is fetched as well: the broker returns its whole batch, and
    the end is one past the last record in it. On Kafka that record is the last one and
    the reported end stands. `consumer` must belong to no group (it is assigned here).

    `known`, kept by the caller between calls on one broker, saves those fetches (each
    of which the embedded broker answers by listing every batch of the partition): a
    written batch never changes and a new one moves the reported end, so a partition
    whose reported end has not moved keeps the end found before. Nor is a partition whose
    reported end already lies past `past[tp]` probed: its end is then the reported one, a
    lower bound, enough to tell that `past` is not the end (`drained`)."""
    reported: dict[TopicPartition, int] = dict(await consumer.end_offsets(partitions))
    known = {} if known is None else known
    past = {} if past is None else past
    ends = {
        tp: known[tp][1] if known.get(tp, (-1, 0))[0] == end else end
        for tp, end in reported.items()
    }
    probe = {
        tp
        for tp, end in reported.items()
        if end > 0 and known.get(tp, (-1, 0))[0] != end and end <= past.get(tp, end)
    }
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
                known[tp] = (reported[tp], ends[tp])
                probe.discard(tp)
    # paused, not unassigned: an empty assignment has the client ask for the metadata of
    # every topic, which the embedded broker answers by listing every batch it holds
    consumer.pause(*consumer.assignment())
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


class BrokerWatch:
    """A process's clients for its periodic looks at the broker (lag, drain checks),
    started at the first look and kept: a look costs only its own requests. A client
    started for each look bootstraps with the metadata of every topic, which the
    embedded broker answers by listing every record batch it holds, so looks made that
    way cost the broker more the more data it held (most of its CPU in a hex-scale run).
    So partitions come from the metadata of the named topics only, each partition's
    end is fetched again only once its reported end moved (`end_offsets`), and a group's
    coordinator is kept between looks (`committed`). A look that fails or is abandoned
    stops the clients; the next one starts them afresh."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None
        self._partitions: dict[str, int] = {}  # topic → partition count
        self._ends: KnownEnds = {}
        self._coordinators: dict[str, int] = {}  # group → its coordinator's node id
        self._starting = asyncio.Lock()  # looks made at once start one pair of clients
        self._probing = asyncio.Lock()  # the probes share the consumer's assignment

    @asynccontextmanager
    async def _look(self) -> AsyncIterator[tuple[AIOKafkaAdminClient, AIOKafkaConsumer]]:
        async with self._starting:
            if self._clients is None:
                admin = _admin(self.bootstrap)
                await admin.start()
                try:
                    self._clients = (admin, await _started_consumer(self.bootstrap))
                except BaseException:
                    await admin.close()
                    raise
            clients = self._clients
        try:
            yield clients
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        clients, self._clients = self._clients, None
        self._ends = {}
        self._coordinators = {}
        if clients is not None:
            admin, consumer = clients
            await consumer.stop()
            await admin.close()

    async def groups(self) -> list[str]:
        async with self._look() as (admin, _):
            return [group for group, *_ in await admin.list_consumer_groups()]

    async def topics(self) -> set[str]:
        """Every topic's name (the metadata of every topic: for one-off looks)."""
        async with self._look() as (_, consumer):
            return set(await consumer.topics())

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """The partitions of those of `topics` that exist."""
        names = sorted(set(topics))
        async with self._look() as (admin, _):
            missing = [name for name in names if name not in self._partitions]
            if missing:
                for topic in await admin.describe_topics(missing):
                    if topic["error_code"] == 0 and topic["partitions"]:
                        self._partitions[topic["topic"]] = len(topic["partitions"])
        return [
            TopicPartition(name, p)
            for name in names
            if name in self._partitions
            for p in range(self._partitions[name])
        ]

    async def ends(
        self, partitions: list[TopicPartition], past: Mapping[TopicPartition, int] | None = None
    ) -> dict[TopicPartition, int]:
        """`end_offsets` of the partitions (lower bounds where they lie past `past`)."""
        async with self._look() as (_, consumer), self._probing:
            return await end_offsets(consumer, partitions, self._ends, past)

    async def committed(
        self, group: str, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition; None where it never committed
        (the broker answers -1 or leaves the partition out). The broker here answers
        OffsetFetch only with explicit partitions.

        The group's coordinator is asked for once, not before each OffsetFetch (half of
        the CPU of a worker's looks at committed offsets): it is kept while it answers
        with committed offsets. An answer with none (nothing committed yet, or a
        coordinator that moved and answers nothing) has it looked up again next time."""
        async with self._look() as (admin, _):
            if group not in self._coordinators:
                self._coordinators[group] = await admin.find_coordinator(group)
            offsets = await admin.list_consumer_group_offsets(
                group, group_coordinator_id=self._coordinators[group], partitions=partitions
            )
        committed = {tp: _offset(offsets.get(tp)) for tp in partitions}
        if all(offset is None for offset in committed.values()):
            self._coordinators.pop(group, None)
        return committed


def _offset(meta: OffsetAndMetadata | None) -> int | None:
    return meta.offset if meta is not None and meta.offset >= 0 else None


@asynccontextmanager
async def watching(settings: Settings, watch: BrokerWatch | None) -> AsyncIterator[BrokerWatch]:
    """`watch`, or one for a single look (closed after it)."""
    if watch is not None:
        yield watch
        return
    once = BrokerWatch(settings.bootstrap)
    try:
        yield once
    finally:
        await once.close()


async def consumer_lag(
    settings: Settings,
    groups: Iterable[str] | None = None,
    topics: Iterable[str] | None = None,
    watch: BrokerWatch | None = None,
) -> list[LagRow]:
    """Committed offset, end offset and lag per group/topic/partition of `topics` (full
    names; default: every exforge topic)."""
    async with watching(settings, watch) as look:
        if groups is None:
            groups = sorted(g for g in await look.groups() if g.startswith(settings.topic_prefix))
        if topics is None:
            topics = [t for t in await look.topics() if t.startswith(settings.topic_prefix)]
        partitions = await look.partitions(topics)
        ends = await look.ends(partitions) if partitions else {}
        rows: list[LagRow] = []
        for group in groups:
            offsets = await look.committed(group, partitions)
            for tp in partitions:
                committed = offsets[tp]
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


async def drained(
    settings: Settings, topics: Iterable[str], watch: BrokerWatch | None = None
) -> bool:
    """Whether every message of these catalogue topics is consumed and committed by the
    worker group.

    Committed offsets are read before end offsets: a message whose processing was
    committed before the first read had produced its outputs before that, so they
    show in the end offsets read after it.
    """
    names = {topic_name(settings.topic_prefix, topic) for topic in topics}
    async with watching(settings, watch) as look:
        partitions = await look.partitions(names)
        if not partitions:
            return True
        committed = await look.committed(settings.worker_group, partitions)
        done = {tp: offset or 0 for tp, offset in committed.items()}
        # a partition with records past its committed offset is not probed for its end
        ends = await look.ends(partitions, past=done)
    return all(ends[tp] <= done[tp] for tp in partitions)


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
    watch: BrokerWatch | None = None  # the process's; None: clients of its own per look
    # whether the process holds input it has not committed (a stage at work on it or
    # delivering its outputs): the inputs are then not drained, without asking the broker
    holding: Callable[[], bool] = lambda: False

    async def observe(self) -> bool:
        """Look once more; True once the inputs were drained `checks` times in a row."""
        if self.holding():
            self.streak = 0
            return False
        try:
            check = drained(self.settings, self.topics, self.watch)
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
