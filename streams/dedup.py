"""Exact and near-duplicate removal in the stream: `files.candidates` → `parsed.files`.

Three agents, each owning its keys by partition in a Faust table:

* `dedup` (on `files.candidates`, keyed by sha256): the first source position of each
  sha256; a file identical to one seen before is dropped (`exact_duplicate`). A new
  one is handed to `neardup` (held) and registered in each of its LSH buckets.
* `neardup-bands` (on `files.bands`, keyed `band:hash`): each partition owns its buckets
  (`exforge.elixir.neardup.Bucket`) and tells the files that collide in them.
* `neardup` (on `files.neardup`, keyed by sha256): holds each new file and what its
  buckets told it. When the whole pipeline is drained (every stage input consumed and
  committed, seen twice in a row) or a file has waited `neardup_max_hold_s` (steady
  inflow never drains), the worker asks each partition it owns to decide:
  every held file is kept or dropped (`near_duplicate`) by `neardup.decide`, which
  depends only on the set of files, so the kept set is the same whatever the number of
  workers or partitions; each decided file settles in its buckets, so later batches
  are near-duplicates of it. The cluster id (sha256 of the first file of the cluster)
  is on every kept `ParsedFile` and in the `neardup-settled` table for every file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import faust
from aiokafka import TopicPartition
from sqlalchemy.orm import Session

from exforge.core import tracing
from exforge.core.db import FileOutcome
from exforge.core.kafka import admin_client, metadata_consumer
from exforge.core.settings import Settings
from exforge.elixir.neardup import Bucket, Held, decide
from schemas.catalogue import STAGE_INPUTS, topic_name
from schemas.records import BandMessage, NearDupEvent, ParsedFile
from streams.stage import Output, Result, StageContext, attach_stage

__all__ = ["attach", "drained", "position", "record_outcome"]

log = logging.getLogger("exforge.dedup")

DECIDE_INTERVAL_S = 1.0
DRAINED_CHECKS = 2  # consecutive drained observations before a batch is decided


def position(file: ParsedFile) -> str:
    return f"{file.source_id}:{file.path}"


def record_outcome(
    ctx: StageContext,
    source_id: str,
    path: str,
    sha256: str | None,
    reason: str | None,
    redactions: dict[str, int] | None = None,
) -> None:
    """Write what became of a file; keyed by position, so replays overwrite."""
    with Session(ctx.engine) as session, session.begin():
        session.merge(
            FileOutcome(
                source_id=source_id,
                path=path,
                sha256=sha256,
                kept=reason is None,
                reason=reason,
                redactions=redactions,
            )
        )


def record_file(ctx: StageContext, file: ParsedFile, reason: str | None) -> None:
    """`record_outcome` for an analysed file, with its redaction counts."""
    record_outcome(ctx, file.source_id, file.path, file.sha256, reason, file.redactions)


async def drained(settings: Settings) -> bool:
    """Whether every stage input is consumed and committed by the worker group.

    Committed offsets are read before end offsets: a message whose processing was
    committed before the first read had produced its outputs before that, so they
    show in the end offsets read after it.
    """
    inputs = {topic_name(settings.topic_prefix, name) for name in STAGE_INPUTS.values()}
    async with admin_client(settings) as admin, metadata_consumer(settings) as consumer:
        topics = [t for t in await consumer.topics() if t in inputs]
        partitions = [
            TopicPartition(t, p) for t in sorted(topics) for p in consumer.partitions_for_topic(t)
        ]
        if not partitions:
            return True
        committed = await admin.list_consumer_group_offsets(
            settings.worker_group, partitions=partitions
        )
        ends = await consumer.end_offsets(partitions)
    for tp in partitions:
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        if ends[tp] > done:
            return False
    return True


def held_too_long(since: Iterable[float], now: float, max_hold_s: float) -> bool:
    """Whether a batch must be decided without waiting for the pipeline to drain.

    Deciding early keeps the guarantee that no two near-duplicates are both kept: a file
    whose bucket-mate is already settled hears `settled` and is dropped; only *which* of
    a pair is kept can then depend on timing."""
    return any(now - t >= max_hold_s for t in since)


@dataclass
class _HeldEntry:
    """A `neardup-held` table value: the file (once its candidate came) and what it heard."""

    partition: int
    since: float  # wall-clock time the file was first held
    file: str | None = None  # ParsedFile JSON
    held: Held = field(default_factory=Held)
    trace: str | None = None  # the file's trace, continued when it is decided

    def dumps(self) -> str:
        return json.dumps(
            {
                "partition": self.partition,
                "since": self.since,
                "file": self.file,
                "earlier": self.held.earlier,
                "settled": self.held.settled,
                "trace": self.trace,
            }
        )

    @classmethod
    def loads(cls, raw: str) -> _HeldEntry:
        data = json.loads(raw)
        return cls(
            data["partition"],
            data["since"],
            data["file"],
            Held(data["earlier"], data["settled"]),
            data.get("trace"),
        )


def _event_partition() -> int:
    event = faust.current_event()
    assert event is not None, "table handlers run inside an agent"
    return event.message.partition


def attach(ctx: StageContext) -> None:
    """The three agents, and the timer that asks owned partitions to decide."""
    settings = ctx.settings
    partitions = settings.topic_partitions

    def table(name: str) -> faust.Table:
        return ctx.app.Table(name, default=str, partitions=partitions, key_type=str, value_type=str)

    first_seen = table("first-seen")
    buckets = table("neardup-buckets")
    held = table("neardup-held")
    settled = table("neardup-settled")

    async def handle_candidate(value: bytes, key: str | None) -> Result:
        file = ParsedFile.model_validate_json(value)
        seen = first_seen[file.sha256]
        if seen and seen != position(file):
            await asyncio.to_thread(record_file, ctx, file, "exact_duplicate")
            return Result(dropped={"exact_duplicate": 1})
        if not seen:
            first_seen[file.sha256] = position(file)
        candidate = NearDupEvent(kind="candidate", sha256=file.sha256, file=file)
        return Result(
            outputs=[
                Output("files.neardup", file.sha256, candidate),
                *(
                    Output("files.bands", band, BandMessage(kind="register", sha256=file.sha256))
                    for band in file.near_dup.bands
                ),
            ]
        )

    async def handle_band(value: bytes, key: str | None) -> Result:
        message = BandMessage.model_validate_json(value)
        assert key is not None, "band messages are keyed by band:hash"
        raw = buckets[key]
        bucket = Bucket(**json.loads(raw)) if raw else Bucket()
        sends: list[tuple[str, str, str]] = []
        if message.kind == "register":
            updated, sends = bucket.register(message.sha256)
        else:
            assert message.cluster is not None
            updated = bucket.settle(message.cluster)
        if updated != bucket:
            buckets[key] = json.dumps({"smallest": updated.smallest, "settled": updated.settled})
        return Result(
            outputs=[
                Output("files.neardup", to, NearDupEvent(kind=kind, sha256=to, other=about))  # type: ignore[arg-type]
                for to, kind, about in sends
            ]
        )

    async def handle_neardup(value: bytes, key: str | None) -> Result:
        event = NearDupEvent.model_validate_json(value)
        if event.kind == "decide":
            assert event.partition is not None
            return await decide_partition(event.partition)
        sha = event.sha256
        assert sha is not None
        cluster = settled[sha]
        if cluster:  # decided in an earlier batch
            if event.kind == "earlier" and event.other is not None:
                reply = NearDupEvent(kind="settled", sha256=event.other, other=cluster)
                return Result(outputs=[Output("files.neardup", event.other, reply)])
            return Result()
        raw = held[sha]
        entry = _HeldEntry.loads(raw) if raw else _HeldEntry(_event_partition(), time.time())
        if event.kind == "candidate" and event.file is not None:
            entry.file = event.file.model_dump_json(by_alias=True, exclude_none=True)
            entry.trace = tracing.traceparent()
        elif event.other is not None:
            entry.held = entry.held.hear(event.kind, event.other)
        held[sha] = entry.dumps()
        return Result()

    async def decide_partition(partition: int) -> Result:
        result = Result()
        for sha, raw in list(held.items()):
            entry = _HeldEntry.loads(raw)
            if entry.partition != partition or entry.file is None:
                continue
            file = ParsedFile.model_validate_json(entry.file)
            duplicate_of = decide(entry.held)
            cluster = duplicate_of or sha
            reason = "near_duplicate" if duplicate_of else None
            await asyncio.to_thread(record_file, ctx, file, reason)
            if reason:
                result.drop(reason)
            else:
                near_dup = file.near_dup.model_copy(update={"cluster": cluster})
                kept = file.model_copy(update={"near_dup": near_dup})
                result.outputs.append(Output("parsed.files", sha, kept, entry.trace))
            settle = BandMessage(kind="settle", sha256=sha, cluster=cluster)
            result.outputs.extend(Output("files.bands", b, settle) for b in file.near_dup.bands)
            settled[sha] = cluster
            decided.append(sha)
        return result

    decided: list[str] = []

    async def forget_decided() -> None:
        """Drop decided files from `held` only once their outputs are acknowledged: a
        crash before that redelivers the `decide`, which decides them again (same keys)."""
        while decided:
            del held[decided.pop()]

    attach_stage(ctx, "dedup", "files.candidates", handle_candidate)
    attach_stage(ctx, "neardup-bands", "files.bands", handle_band)
    attach_stage(ctx, "neardup", "files.neardup", handle_neardup, after=forget_decided)

    neardup_topic = topic_name(settings.topic_prefix, "files.neardup")

    def owned_with_held() -> dict[int, float]:
        """Partitions of `files.neardup` this worker owns that hold undecided files, with
        the time the oldest of them was first held."""
        owned = {
            tp.partition for tp in ctx.app.assignor.assigned_actives() if tp.topic == neardup_topic
        }
        oldest: dict[int, float] = {}
        for raw in held.values():
            entry = _HeldEntry.loads(raw)
            if entry.partition in owned and entry.file is not None:
                oldest[entry.partition] = min(entry.since, oldest.get(entry.partition, entry.since))
        return oldest

    ctx.busy.append(lambda: bool(owned_with_held()))
    streak = [0]

    @ctx.app.timer(interval=DECIDE_INTERVAL_S, name="neardup-decide")
    async def ask_to_decide() -> None:
        waiting = owned_with_held()
        if not waiting:
            streak[0] = 0
            return
        try:
            streak[0] = streak[0] + 1 if await drained(settings) else 0
        except Exception as exc:  # the broker may be restarting: try again next tick
            log.warning("drain check failed: %s", exc)
            streak[0] = 0
        overdue = held_too_long(waiting.values(), time.time(), settings.neardup_max_hold_s)
        if streak[0] < DRAINED_CHECKS and not overdue:
            return
        if overdue:
            log.info("near-dup: files held over %.0f s, deciding now", settings.neardup_max_hold_s)
        streak[0] = 0
        topic = ctx.topic("files.neardup")
        for partition in sorted(waiting):
            ask = NearDupEvent(kind="decide", partition=partition)
            await (await topic.send(value=ask.to_bytes(), partition=partition))
        log.info("near-dup: deciding partitions %s", sorted(waiting))
