"""Committed offsets of stage inputs move only over handled messages (streams.offsets)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from conftest import Pipeline
from faust.types import TP

from exforge.core.kafka import (
    BrokerWatch,
    DrainWatch,
    consumer_lag,
    create_topics,
    drained,
    end_offsets,
    metadata_consumer,
    producer,
    read_all,
)
from exforge.core.settings import Settings
from schemas.catalogue import topic_name
from streams.offsets import BrokerOffsets, HandledOffsets, Rewinds, resolve

PARSED = TP("t.parsed.files", 0)


def test_the_committable_offset_moves_only_over_handled_offsets() -> None:
    books = HandledOffsets()
    books.mark(PARSED, 7)
    assert books.committable(PARSED) is None  # committed offset not known yet
    assert books.unknown_base() == [PARSED]
    books.start(PARSED, 5)
    assert books.committable(PARSED) == 5  # 5 and 6 are not handled
    assert books.jumps() == {PARSED: 5}
    books.mark(PARSED, 5)
    assert books.committable(PARSED) == 6
    books.mark(PARSED, 6)
    assert books.committable(PARSED) == 8  # 5, 6, 7 handled: commit 8
    assert books.jumps() == {}


def test_a_confirmed_hole_is_passed_and_an_unhandled_message_is_not() -> None:
    books = HandledOffsets()
    books.mark(PARSED, 14)
    books.mark(PARSED, 15)
    books.start(PARSED, 10)
    books.skip_to(PARSED, 12)  # the broker holds nothing at 10 and 11, but 12 exists
    assert books.committable(PARSED) == 12
    books.skip_to(PARSED, 14)  # 12 and 13 turn out to be holes too
    assert books.committable(PARSED) == 16
    books.skip_to(PARSED, 3)  # never backwards
    assert books.committable(PARSED) == 16


def test_a_message_still_delivering_is_no_skip_until_its_delivery_fails() -> None:
    """A message without outputs is handled at once, while the one before it in its
    partition may still wait for acknowledgements (streams.stage.deliver): not a skip."""
    books = HandledOffsets()
    books.deliver(PARSED, 5)
    books.start(PARSED, 5)
    books.deliver(PARSED, 6)
    books.mark(PARSED, 6)
    assert books.jumps() == {}
    assert books.committable(PARSED) == 5
    books.mark(PARSED, 5)
    assert books.committable(PARSED) == 7
    books.deliver(PARSED, 7)
    books.mark(PARSED, 8)
    assert books.jumps() == {}
    books.abandon(PARSED, 7)  # its outputs were not acknowledged: fetch it again
    assert books.jumps() == {PARSED: 7}


def test_redelivered_offsets_below_the_base_are_ignored_and_forget_resets() -> None:
    books = HandledOffsets()
    books.mark(PARSED, 2)  # handled before the committed offset was known
    books.start(PARSED, 4)
    assert books.committable(PARSED) == 4
    books.mark(PARSED, 3)  # redelivered after a seek
    assert books.committable(PARSED) == 4
    assert books.jumps() == {}
    books.forget([PARSED])
    assert books.committable(PARSED) is None
    books.start(PARSED, 9)  # revoked meanwhile: nothing comes back
    assert books.committable(PARSED) is None


def test_the_books_say_which_handled_messages_are_not_committed() -> None:
    """What a worker that cannot stop in time reports (streams.worker.pending_work)."""
    books = HandledOffsets()
    books.mark(PARSED, 3)
    assert books.uncommitted() == {PARSED: (None, 1)}  # committed offset unknown
    books.start(PARSED, 2)
    assert books.uncommitted() == {PARSED: (2, 1)}  # 3 handled, 2 not: nothing committable
    books.mark(PARSED, 2)
    assert books.uncommitted() == {PARSED: (2, 2)}
    books.was_committed({PARSED: 4})
    assert books.uncommitted() == {}
    books.mark(PARSED, 4)
    assert books.uncommitted() == {PARSED: (4, 1)}
    books.forget([PARSED])
    assert books.uncommitted() == {} and books.committed == {}


@pytest.mark.slow
async def commit_as_worker_group(
    settings: Settings, partition: TopicPartition, offset: int
) -> None:
    group = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap,
        group_id=settings.worker_group,
        enable_auto_commit=False,
    )
    await group.start()
    try:
        group.assign([partition])
        await group.commit({partition: offset})
    finally:
        await group.stop()


def test_the_broker_decides_jumps_and_committed_offsets(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    name = topic_name(settings.topic_prefix, "parsed.files")
    tp = TP(name, 0)

    async def scenario() -> tuple[int, int | None, int, int]:
        await create_topics(settings)
        async with producer(settings) as client:
            for _ in range(6):
                await client.send_and_wait(name, b"v", partition=0)
        broker = BrokerOffsets(settings.bootstrap, settings.worker_group)
        try:
            never_committed = await broker.committed(tp)
            first = await broker.first_offset(tp, 2)
            books = HandledOffsets()
            books.mark(tp, 4)  # 0..3 exist and were not handled: no jump is passed
            skipped = await resolve(books, broker)
            assert skipped == {tp: 0}  # and offset 0 must be fetched again
            unhandled = books.committable(tp)
            waiting = HandledOffsets()
            waiting.deliver(tp, 0)  # its outputs wait for acknowledgements
            waiting.mark(tp, 1)
            assert await resolve(waiting, broker) == {}  # no rewind for that
            assert waiting.committable(tp) == 0
            # a commit by the group is what a restarted worker starts from
            await commit_as_worker_group(settings, TopicPartition(name, 0), 3)
            return never_committed, unhandled, first, await broker.committed(tp)
        finally:
            await broker.stop()

    never_committed, unhandled, first, committed = asyncio.run(scenario())
    assert never_committed == 0
    assert first == 2
    assert unhandled == 0
    assert committed == 3


def test_a_skipped_partition_is_rewound_once_per_base_then_after_a_cooldown() -> None:
    rewinds = Rewinds(cooldown_s=10)
    assert rewinds.due(PARSED, 5, now=0)
    assert not rewinds.due(PARSED, 5, now=9)  # the seek may still be in flight
    assert rewinds.due(PARSED, 7, now=9)  # progress, then a new skip
    assert rewinds.due(PARSED, 7, now=19.5)  # the seek did not bring it back: again


def test_end_offsets_and_lag_count_every_record_of_a_batch(pipeline: Pipeline) -> None:
    """Records produced in one batch all count: the embedded broker reports the end of a
    partition as its last batch's base offset plus one, which would let a worker call a
    partition consumed while records of its last batch wait."""
    settings = pipeline.settings
    name = topic_name(settings.topic_prefix, "parsed.files")
    partition = TopicPartition(name, 0)

    async def scenario() -> tuple[int, list[int], list[int]]:
        await create_topics(settings)
        async with producer(settings) as client:
            sent = [await client.send(name, b"v", partition=0) for _ in range(3)]
            await asyncio.gather(*sent)  # three records, one produce request
            await client.send_and_wait(name, b"w", partition=0)
            sent = [await client.send(name, b"x", partition=0) for _ in range(2)]
            await asyncio.gather(*sent)
        await commit_as_worker_group(settings, partition, 5)  # all but the last record
        async with metadata_consumer(settings) as consumer:
            ends = await end_offsets(consumer, [partition])
        lag = [r.lag for r in await consumer_lag(settings) if r.topic == name and r.partition == 0]
        records = await read_all(settings, "parsed.files")
        return ends[partition], lag, [r.offset for r in records if r.partition == 0]

    end, lag, offsets = asyncio.run(scenario())
    assert offsets == [0, 1, 2, 3, 4, 5]
    assert end == 6
    assert lag == [1]


@asynccontextmanager
async def counting_forwarder(bootstrap: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP forwarder to `bootstrap`, and the count of connections it took: a client
    bootstraps through it (then talks to the broker's advertised address)."""
    host, port = bootstrap.rsplit(":", 1)
    accepted = [0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def forward(client: asyncio.StreamReader, back: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        upstream, out = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client, out), pipe(upstream, back))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted
    finally:
        server.close()


def test_a_watch_looks_again_without_new_clients_and_sees_new_records(
    pipeline: Pipeline,
) -> None:
    """A worker's periodic looks (lag, drain checks) go through one `BrokerWatch`: its
    clients start once, not per look (each start has the embedded broker list every
    record batch it holds), and a partition's end, remembered between looks, still moves
    with every new batch, each of whose records counts."""
    settings = pipeline.settings
    name = topic_name(settings.topic_prefix, "parsed.files")
    partition = TopicPartition(name, 0)

    async def batch(records: int) -> None:
        async with producer(settings) as client:
            await asyncio.gather(
                *[await client.send(name, b"v", partition=0) for _ in range(records)]
            )

    async def scenario() -> tuple[list[object], int]:
        await create_topics(settings)
        seen: list[object] = []
        async with counting_forwarder(settings.bootstrap) as (bootstrap, accepted):
            watched = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            watch = BrokerWatch(bootstrap)

            async def look() -> None:
                rows = await consumer_lag(watched, [settings.worker_group], [name], watch)
                seen.append([r.lag for r in rows if r.partition == 0])
                seen.append(await drained(watched, ["parsed.files"], watch))

            try:
                await look()
                await batch(3)
                await look()
                await look()
                await batch(2)
                await look()
                await commit_as_worker_group(settings, partition, 4)  # within the last batch
                await look()
                await commit_as_worker_group(settings, partition, 5)
                await look()
            finally:
                await watch.close()
            return seen, accepted[0]

    seen, clients = asyncio.run(scenario())
    assert seen == [[], True, [3], False, [3], False, [5], False, [1], False, [0], True]
    assert clients == 2  # the admin client and the consumer, once


def test_a_watch_keeps_the_group_coordinator_while_it_answers_with_commits(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look at committed offsets sent a FindCoordinator request before each
    OffsetFetch (half the CPU of a worker's looks): the watch asks once and keeps the
    answer while the coordinator answers with committed offsets; an answer with none
    (nothing committed yet, or a coordinator that moved) has it asked again."""
    settings = pipeline.settings
    partition = TopicPartition(topic_name(settings.topic_prefix, "parsed.files"), 0)
    finds = [0]
    find = AIOKafkaAdminClient.find_coordinator

    async def counted(admin: AIOKafkaAdminClient, *args: Any, **kwargs: Any) -> int:
        finds[0] += 1
        return await find(admin, *args, **kwargs)

    monkeypatch.setattr(AIOKafkaAdminClient, "find_coordinator", counted)

    async def scenario() -> list[object]:
        await create_topics(settings)
        watch = BrokerWatch(settings.bootstrap)
        seen: list[object] = []

        async def look() -> None:
            committed = await watch.committed(settings.worker_group, [partition])
            seen.append((committed[partition], finds[0]))

        try:
            await look()
            await look()
            await commit_as_worker_group(settings, partition, 4)
            await look()
            await look()
            await look()
        finally:
            await watch.close()
        return seen

    assert asyncio.run(scenario()) == [(None, 1), (None, 2), (4, 3), (4, 3), (4, 3)]


def test_a_drain_check_the_broker_never_answers_is_abandoned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that takes the connection and never answers: the drain check gives up
    after its own timeout (well before the client's request timeout), counts as not
    drained, and so cannot stop the timer that looks (shard sealing, near-dup decisions)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        settings = Settings(kafka_bootstrap=f"127.0.0.1:{port}")
        watch = DrainWatch(settings, ("parsed.files",), streak=1, timeout_s=0.5)
        with caplog.at_level(logging.WARNING, logger="exforge.kafka"):
            assert asyncio.run(watch.observe()) is False
    assert watch.streak == 0
    assert "drain check abandoned: no answer in 0.5 s" in caplog.text


def test_a_drain_watch_of_a_process_holding_input_does_not_ask_the_broker(
    pipeline: Pipeline,
) -> None:
    """While a stage of the process holds input it has not committed, the inputs are not
    drained: the watch says so without a look at the broker (no client connects), and
    the streak of drained looks starts again."""
    settings = pipeline.settings
    holding = [True]

    async def scenario() -> list[object]:
        await create_topics(settings)
        seen: list[object] = []
        async with counting_forwarder(settings.bootstrap) as (bootstrap, accepted):
            watched = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            watch = DrainWatch(watched, ("parsed.files",), checks=1, holding=lambda: holding[0])
            seen += [await watch.observe(), accepted[0]]
            holding[0] = False
            seen += [await watch.observe(), watch.streak, accepted[0] > 0]
            holding[0] = True
            seen += [await watch.observe(), watch.streak]
        return seen

    assert asyncio.run(scenario()) == [False, 0, True, 1, True, False, 0]
