"""Which input offsets a worker may commit: only those every agent really handled.

Faust's own bookkeeping commits past messages nobody handled now and then: it
acknowledges events it skips during a rebalance, and it counts every jump in fetched
offsets as a compaction gap (so after a seek, a prefetched batch from the old position
marks the messages in between as done). The embedded broker also leaves real holes in
offsets after a producer is killed, so jumps cannot simply be refused either.

So the worker keeps its own books: an agent marks an offset *handled* once its outputs
are acknowledged (`streams.stage.deliver`; *delivering* until then), the committable
offset of a partition only moves over handled offsets, and a jump is passed only when
the broker confirms that the offsets in it do not exist (`BrokerOffsets.first_offset`).
Faust's commit timer, revocation and shutdown still decide *when* to commit; this
module decides *what*.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.types import TP, Message

from exforge.core.kafka import bootstrap_consumer, end_offsets

log = logging.getLogger("exforge.offsets")


class Uncommitted(NamedTuple):
    """A partition's handled offsets that the group has not committed."""

    committed: int | None  # the offset last committed; None: unknown
    handled: int  # how many offsets past it were handled


@dataclass
class PartitionProgress:
    """`base`: the next offset to commit (None until the committed offset is known);
    `handled`: offsets at or above it that an agent finished; `delivering`: offsets whose
    outputs wait for the broker's acknowledgements."""

    base: int | None = None
    handled: set[int] = field(default_factory=set)
    delivering: set[int] = field(default_factory=set)

    def deliver(self, offset: int) -> None:
        if self.base is None or offset >= self.base:
            self.delivering.add(offset)

    def mark(self, offset: int) -> None:
        self.delivering.discard(offset)
        if self.base is None or offset >= self.base:  # below it: a redelivery, done
            self.handled.add(offset)
            self.advance()

    def abandon(self, offset: int) -> None:
        """The offset's outputs were not acknowledged: it is neither handled nor on its
        way, so a jump over it is a skip (and rewound)."""
        self.delivering.discard(offset)

    def move_base(self, base: int) -> None:
        """Start counting at `base` (a committed offset, or past a confirmed hole)."""
        self.base = base
        self.handled = {offset for offset in self.handled if offset >= base}
        self.delivering = {offset for offset in self.delivering if offset >= base}
        self.advance()

    def advance(self) -> None:
        """Move the base over the handled offsets that follow it."""
        if self.base is None:
            return
        while self.base in self.handled:
            self.handled.discard(self.base)
            self.base += 1

    def jump(self) -> int | None:
        """The base, when the next handled offset lies past it and the base is not on its
        way: a message without outputs is handled at once, while an earlier one of its
        partition may still wait for acknowledgements, and that gap is no skip."""
        if (
            self.base is not None
            and self.base not in self.delivering
            and self.handled
            and min(self.handled) > self.base
        ):
            return self.base
        return None


class HandledOffsets:
    """Per-partition progress; plain bookkeeping, no I/O."""

    def __init__(self) -> None:
        self.partitions: dict[TP, PartitionProgress] = {}
        # the offset the group last committed, as far as this process knows
        self.committed: dict[TP, int] = {}

    def deliver(self, tp: TP, offset: int) -> None:
        self.partitions.setdefault(tp, PartitionProgress()).deliver(offset)

    def mark(self, tp: TP, offset: int) -> None:
        self.partitions.setdefault(tp, PartitionProgress()).mark(offset)

    def abandon(self, tp: TP, offset: int) -> None:
        progress = self.partitions.get(tp)
        if progress is not None:
            progress.abandon(offset)

    def start(self, tp: TP, committed: int) -> None:
        """The partition's committed offset is `committed`: count from there."""
        progress = self.partitions.get(tp)  # None: revoked meanwhile
        if progress is not None:
            self.committed.setdefault(tp, committed)
            progress.move_base(max(committed, progress.base or 0))

    def was_committed(self, offsets: Mapping[TP, int]) -> None:
        """The broker took these commits."""
        self.committed.update(offsets)

    def uncommitted(self) -> dict[TP, Uncommitted]:
        """Partitions holding handled offsets the group has not committed: a restart reads
        them again. (Safe to call from another thread: it only copies.)"""
        found = {}
        for tp, progress in list(self.partitions.items()):
            committed, base = self.committed.get(tp), progress.base
            moved = base - committed if base is not None and committed is not None else 0
            handled = max(moved, 0) + len(progress.handled)
            if handled:
                found[tp] = Uncommitted(committed, handled)
        return found

    def skip_to(self, tp: TP, offset: int) -> None:
        """The broker has no offsets between the base and `offset`."""
        progress = self.partitions.get(tp)
        if progress is not None and progress.base is not None and offset > progress.base:
            progress.move_base(offset)

    def committable(self, tp: TP) -> int | None:
        progress = self.partitions.get(tp)
        return None if progress is None else progress.base

    def unknown_base(self) -> list[TP]:
        return [tp for tp, p in self.partitions.items() if p.base is None]

    def jump(self, tp: TP) -> int | None:
        """The partition's base, when its next handled offset lies past it."""
        progress = self.partitions.get(tp)
        return None if progress is None else progress.jump()

    def jumps(self) -> dict[TP, int]:
        """Partitions whose next handled offset lies past the base → that base."""
        return {tp: base for tp in self.partitions if (base := self.jump(tp)) is not None}

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.partitions.pop(tp, None)
            self.committed.pop(tp, None)


class HandledOffsetsConsumer(FaustAIOKafkaConsumer):
    """Faust's consumer, committing from `HandledOffsets` instead of from its acks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = HandledOffsets()

    def ack(self, message: Message) -> bool:
        # Faust also acks events it skipped; only `mark_handled` moves commits.
        if not message.acked:
            message.acked = True
            self._unacked_messages.discard(message)
        return False

    def mark_delivering(self, message: Message) -> None:
        if message.tp in self.assignment():
            self.progress.deliver(message.tp, message.offset)

    def mark_handled(self, message: Message) -> None:
        if message.tp in self.assignment():
            self.progress.mark(message.tp, message.offset)

    def mark_abandoned(self, message: Message) -> None:
        self.progress.abandon(message.tp, message.offset)

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Iterator[TP]:
        return (
            tp
            for tp in list(self.progress.partitions)
            if topics is None or tp in topics or tp.topic in topics
        )

    def _new_offset(self, tp: TP) -> int | None:
        return self.progress.committable(tp)

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        done = bool(await super()._commit(offsets))
        if done:
            self.progress.was_committed(offsets)
        return done

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        """One past the last record of each partition. Faust's table recovery reads each
        changelog up to this end and refuses a RocksDB store that applied records past
        it; the embedded broker reports a partition's end short of its last record batch
        (`exforge.core.kafka.end_offsets`), and one handler's table writes go out in one
        batch, so without the correction a worker never restarted on its own tables."""
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in self.app.conf.broker)
        async with bootstrap_consumer(bootstrap) as probe:
            ends = await end_offsets(probe, [TopicPartition(*tp) for tp in partitions])
        return {TP(tp.topic, tp.partition): end for tp, end in ends.items()}

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        # Faust waits here for the events in flight; commit what they finished, then
        # forget: the next owner (maybe us again) starts from the committed offset.
        await super().on_partitions_revoked(revoked)
        try:
            await self.commit(revoked)
        except Exception as exc:  # the next owner redoes the work (idempotent)
            log.warning("commit on revocation failed: %s", exc)
        self.progress.forget(revoked)


class BrokerOffsets:
    """Asks the broker what it holds: committed offsets and the first existing offset."""

    def __init__(self, bootstrap: str, group: str) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.consumer: AIOKafkaConsumer | None = None

    async def _ready(self) -> AIOKafkaConsumer:
        if self.consumer is None:  # created on the worker's loop, at first use
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await consumer.start()
            self.consumer = consumer
        return self.consumer

    async def committed(self, tp: TP) -> int:
        """The group's committed offset, or the log start when it never committed."""
        consumer = await self._ready()
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        offset = await consumer.committed(partition)
        if offset is not None and offset >= 0:
            return int(offset)
        return int((await consumer.beginning_offsets([partition]))[partition])

    async def first_offset(self, tp: TP, start: int) -> int | None:
        """The lowest offset ≥ `start` that holds a record (None if none arrives)."""
        consumer = await self._ready()
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        consumer.seek(partition, start)
        batch = await consumer.getmany(partition, timeout_ms=2000, max_records=1)
        records = batch.get(partition, [])
        return records[0].offset if records else None

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None


@dataclass
class Rewinds:
    """When to fetch a partition again from its base: once per base, then again only
    after `cooldown_s` (a seek in flight must not be repeated every tick)."""

    cooldown_s: float = 10.0
    last: dict[TP, tuple[int, float]] = field(default_factory=dict)

    def due(self, tp: TP, base: int, now: float) -> bool:
        previous = self.last.get(tp)
        if previous is not None and previous[0] == base and now - previous[1] < self.cooldown_s:
            return False
        self.last[tp] = (base, now)
        return True


async def resolve(progress: HandledOffsets, broker: BrokerOffsets) -> dict[TP, int]:
    """Fill in unknown bases from the broker and pass the jumps it confirms as holes.
    Until then those partitions commit nothing, which is safe.

    Returns the partitions whose base holds a record that was skipped: a later offset was
    handled, and a partition is delivered in order, so only a seek brings it back."""
    for tp in progress.unknown_base():
        progress.start(tp, await broker.committed(tp))
    skipped: dict[TP, int] = {}
    for tp, base in progress.jumps().items():
        first = await broker.first_offset(tp, base)
        if first is None:
            continue
        if first > base:
            log.info("%s:%d has no offsets %d..%d", tp.topic, tp.partition, base, first - 1)
            progress.skip_to(tp, first)
        still = progress.jump(tp)
        if still is not None:
            skipped[tp] = still
    return skipped
