"""Exact and near-duplicate removal in the stream: `files.candidates` → `parsed.files`.

`NearDup` runs three agents over four Faust tables; every key is owned by one partition:

* `dedup` (on `files.candidates`, keyed by sha256): the first source position of each
  sha256 (`first-seen`); a file identical to one seen before is dropped
  (`exact_duplicate`). A new one is held (`neardup-held`, on the partition its
  `files.neardup` messages go to: the same key, the same partition count) and enters
  its LSH buckets: one `files.bands` message, to the first partition that owns some of
  them (`exforge.elixir.neardup.bucket_partition`).
* `neardup-bands` (on `files.bands`): each partition keeps the smallest sha256 of each
  of its buckets (`neardup-buckets`). `Bucket.register` says what each file concerned
  hears: a newcomer hears `earlier` of a smaller member; a member displaced by a
  smaller newcomer hears `displaced` (sent to it at once), and the newcomer `later`,
  so that it waits for the displaced member's `answer`. What the newcomer hears goes on
  with the rest of its bands to the next partition owning some, in partition order;
  the last one tells the file all of it in one `registered` event (one message a file,
  however many partitions its buckets are on).
* `neardup` (on `files.neardup`, keyed by sha256): a held file records what it hears;
  a displaced file answers the newcomer: with its cluster if it was decided in an
  earlier batch, so that the newcomer is dropped; if it is held, once it is ready, with
  the cluster of an earlier batch's file it collides with, if any (through it the
  newcomer may collide with that file, which no longer is its bucket's smallest).

A held file is *ready* once its registration went through every partition
(`registered`) and every file it displaced answered: it has heard everything its own
registration caused, so no decision depends on when a batch is decided. A batch takes
only ready files; the others wait for the next one.

Batches: when everything upstream of the decision (`sources.requests` up to
`files.neardup`) is consumed and committed, seen twice in a row, or a file has waited
`neardup_max_hold_s` (steady inflow never drains), the worker asks each partition it
owns to decide: every held file is kept or dropped (`near_duplicate`) by
`neardup.decide`, which depends only on the set of files, so the kept set is the same
whatever the number of workers or partitions. A partition decides its batch in chunks of
`neardup_decide_chunk` files, each `decide` event asking for the next, so that a
worker's memory does not grow with the batch (the whole corpus, when it is requested at
once). The stages after `parsed.files` do not
hold the decision back: they run while the next batch is parsed. The cluster id is on
every kept `ParsedFile` (its own sha256) and in `neardup-settled` for every file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import faust
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core import tracing
from exforge.core.db import FileOutcome, upsert
from exforge.core.kafka import DrainWatch
from exforge.elixir.neardup import Bucket, Held, bucket_partition, decide
from schemas.catalogue import STAGE_INPUTS, topic_name
from schemas.records import BandMessage, NearDupEvent, ParsedFile
from streams.stage import Output, Result, StageContext, attach_stage

__all__ = [
    "UPSTREAM",
    "HeldFile",
    "NearDup",
    "Outcome",
    "attach",
    "position",
    "record_outcomes",
]

log = logging.getLogger("exforge.dedup")

# A batch is decided two drain checks after its last input is committed (Faust commits
# every 0.5 s too): the time from a drained pipeline to the first file reaching instruct.
DECIDE_INTERVAL_S = 0.5
# What a held file with bands awaits first: its registration's end (`registered`).
REGISTERED = "registered"
# The `neardup-held` key of a held file's ParsedFile, beside its header (its sha256)
FILE = ":file"
# The stages whose inputs must be drained before a batch is decided: all that feed it.
UPSTREAM = ("ingest", "parse", "dedup", "neardup-bands", "neardup")


def position(file: ParsedFile) -> str:
    return f"{file.source_id}:{file.path}"


@dataclass(frozen=True)
class Outcome:
    """What became of a file of a package: kept (reason None) or dropped, and why."""

    source_id: str
    path: str
    sha256: str | None
    reason: str | None
    redactions: dict[str, int] | None = None

    @classmethod
    def of(cls, file: ParsedFile, reason: str | None) -> Outcome:
        return cls(file.source_id, file.path, file.sha256, reason, file.redactions)


def record_outcomes(engine: Engine, outcomes: Iterable[Outcome]) -> None:
    """Write what became of files, in one statement; keyed by position, so replays
    overwrite (an upsert: `Session.merge` looked each row up first, 4 % of a worker's
    CPU at 300 packages)."""
    rows = [
        {
            "source_id": outcome.source_id,
            "path": outcome.path,
            "sha256": outcome.sha256,
            "kept": outcome.reason is None,
            "reason": outcome.reason,
            "redactions": outcome.redactions,
        }
        for outcome in outcomes
    ]
    with Session(engine) as session, session.begin():
        upsert(session, FileOutcome, rows)


def held_too_long(since: Iterable[float], now: float, max_hold_s: float) -> bool:
    """Whether a batch must be decided without waiting for the pipeline to drain.

    Deciding early keeps the guarantee that no two near-duplicates are both kept only
    because a batch takes ready files alone (`HeldFile.ready`): a file decided before
    its own registrations were processed would be kept, and a bucket-mate decided in an
    earlier batch too. Only *which* of a pair is kept depends on timing."""
    return any(now - t >= max_hold_s for t in since)


@dataclass
class HeldFile:
    """A `neardup-held` value: a file waiting for its batch's decision, and what it
    heard, as a one-line header. The file is apart (key sha256 + `FILE`), written once:
    each event the file hears rewrites the header (~300 bytes) and its changelog record,
    not the file's (~14 KB: the held changelog was 2.7 times `files.candidates`).

    `awaiting` names what the file must hear before it is decided: the end of its
    registration (`REGISTERED`, for a file with bands) and the files it displaced
    (their `answer`); `received`, what it heard of these; `owed`, the files that
    displaced it, answered once it is ready. Sets, so that redeliveries change
    nothing."""

    partition: int
    since: float  # wall-clock time the file was first held
    heard: Held = field(default_factory=Held)
    trace: str | None = None  # the file's trace (traceparent), continued when it is decided
    awaiting: frozenset[str] = frozenset()
    received: frozenset[str] = frozenset()
    owed: frozenset[str] = frozenset()

    @property
    def ready(self) -> bool:
        return self.awaiting <= self.received

    def hear(self, event: NearDupEvent) -> None:
        if event.kind == "registered":
            self.received |= {REGISTERED}
            self.awaiting |= set(event.later)
            if event.other:
                self.heard = self.heard.hear("earlier", event.other)
            return
        assert event.other is not None
        if event.kind == "displaced":  # by a smaller file, owed an answer
            self.heard = self.heard.hear("displaced", event.other)
            self.owed |= {event.other}
        elif event.kind == "answer":
            self.received |= {event.other}
            if event.cluster:
                self.heard = self.heard.hear("settled", event.cluster)

    def dumps(self) -> str:
        sets = (",".join(sorted(s)) for s in (self.awaiting, self.received, self.owed))
        fields = (self.heard.earlier, self.heard.settled, self.trace, *sets)
        optional = " ".join(value or "-" for value in fields)
        return f"{self.partition} {self.since!r} {optional}"

    @classmethod
    def loads(cls, raw: str) -> HeldFile:
        partition, since, *optional = raw.split(" ")
        earlier, settled, trace, *sets = (None if value == "-" else value for value in optional)
        awaiting, received, owed = (frozenset(s.split(",")) if s else frozenset() for s in sets)
        return cls(
            int(partition),
            float(since),
            Held(earlier, settled),
            trace,
            awaiting,
            received,
            owed,
        )

    def answers(self, sha: str, to: Iterable[str] | None = None) -> list[Output]:
        """The answers to the files that displaced this held one (`sha`; `to`: those
        of them only): once it is ready, it knows the files of earlier batches it
        collides with (`heard.settled`), which they collide with too (the same bucket)
        or may (another one: dropping them is safe). It is dropped itself: it heard of
        them (`earlier`)."""
        return [
            Output(
                "files.neardup",
                to,
                NearDupEvent(kind="answer", sha256=to, other=sha, cluster=self.heard.settled),
            )
            for to in sorted(self.owed if to is None else to)
        ]


@dataclass
class Waiting:
    """A partition's held files not in a batch yet (sha256 → when first held), the
    ready ones apart: a batch takes `ready` as it is, and the timer looks at `ready`
    alone, so neither reads the table for a file that is not ready. Kept beside the
    table by the events that change a file's readiness (`NearDup.hold`,
    `NearDup.on_neardup`), and rebuilt from the table after a rebalance."""

    ready: dict[str, float] = field(default_factory=dict)
    unready: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.ready or self.unready)

    def put(self, sha: str, since: float, ready: bool) -> None:
        (self.ready if ready else self.unready)[sha] = since
        (self.unready if ready else self.ready).pop(sha, None)

    def update(self, sha: str, ready: bool) -> None:
        """A waiting file's readiness (a file not waiting is left alone: in a batch, or
        held before its candidate came)."""
        since = self.ready.get(sha, self.unready.get(sha))
        if since is not None:
            self.put(sha, since, ready)

    def take_ready(self) -> list[str]:
        """The ready files, in sha256 order, taken off: a batch."""
        batch = sorted(self.ready)
        self.ready = {}
        return batch


def decided_span(trace: str | None, sha256: str, reason: str | None) -> Any:
    """The span of a file's decision, in the file's trace (`trace`, its traceparent)."""
    attributes = {"exforge.sha256": sha256, "exforge.outcome": reason or "kept"}
    return tracing.consumed("neardup process", tracing.kafka_headers(trace), attributes)


def decide_output(partition: int) -> Output:
    """The `decide` event that asks `partition` to decide (the next chunk of) a batch."""
    return Output(
        "files.neardup",
        f"decide:{partition}",
        NearDupEvent(kind="decide", partition=partition),
        partition=partition,
    )


def _event_partition() -> int:
    event = faust.current_event()
    assert event is not None, "table handlers run inside an agent"
    return event.message.partition


class NearDup:
    """The dedup and near-dup agents of one worker, their tables and decision timer."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.partitions = ctx.settings.topic_partitions
        self.first_seen = ctx.table("first-seen")
        self.buckets = ctx.table("neardup-buckets")
        self.held = ctx.table("neardup-held")
        self.settled = ctx.table("neardup-settled")
        # held files of owned partitions not yet in a batch, ready or not (`Waiting`):
        # kept beside the table so the timer need not read it; rebuilt after a rebalance
        self.waiting: dict[int, Waiting] = {}
        # the files of each partition's batch not yet decided, in the order decided
        self.batches: dict[int, list[str]] = {}
        # the files this worker decided whose outputs are not acknowledged yet (then they
        # are forgotten): decided once here, even if a rebalance leaves it their
        # partition or their candidate is read again meanwhile (only a restart, or a
        # worker that takes over their partition, decides them again: at-least-once)
        self.deciding: set[str] = set()
        # what `waiting` was indexed for: the owned partitions, and the rebalance (a
        # partition that left and came back may have changed meanwhile)
        self.indexed: tuple[frozenset[int], int] | None = None
        # a process whose upstream stages are at work does not ask the broker: their input
        # is not committed, so the look could only say no (one look every half second in
        # each process while ready files waited, the whole parse phase)
        self.drain = DrainWatch(
            ctx.settings,
            tuple(STAGE_INPUTS[stage] for stage in UPSTREAM),
            watch=ctx.broker,
            holding=lambda: ctx.holding_input(UPSTREAM),
        )
        self.neardup_topic = topic_name(ctx.settings.topic_prefix, "files.neardup")

    def attach(self) -> None:
        attach_stage(self.ctx, "dedup", "files.candidates", self.on_candidate)
        attach_stage(self.ctx, "neardup-bands", "files.bands", self.on_bands)
        attach_stage(self.ctx, "neardup", "files.neardup", self.on_neardup)
        self.ctx.busy.append(self.busy)
        self.ctx.app.timer(interval=DECIDE_INTERVAL_S, name="neardup-decide")(self.ask_to_decide)

    # ------------------------------------------------------------------ handlers

    async def on_candidate(self, value: bytes, key: str | None) -> Result:
        """Drop an exact duplicate; hold a new file and enter it in its buckets."""
        file = ParsedFile.model_validate_json(value)
        result = Result(items={"files": 1})
        seen = self.first_seen[file.sha256]
        if seen and seen != position(file):
            outcome = Outcome.of(file, "exact_duplicate")
            await asyncio.to_thread(record_outcomes, self.ctx.engine, [outcome])
            result.drop("exact_duplicate")
            return result
        if not seen:
            self.first_seen[file.sha256] = position(file)
        if self.settled[file.sha256]:  # a redelivery of a file decided before
            return result
        registration = self.registration(file)
        self.hold(file, value.decode(), registering=registration is not None)
        if registration:
            result.outputs.append(registration)
        return result

    def hold(self, file: ParsedFile, raw_file: str, registering: bool) -> None:
        """Hold a file (`raw_file`: its candidate's JSON, as it came) until its batch
        (`registering`: awaiting `registered`)."""
        raw = self.held[file.sha256]
        partition = _event_partition()
        entry = HeldFile.loads(raw) if raw else HeldFile(partition, time.time())
        entry.trace = tracing.traceparent()
        if registering:
            entry.awaiting |= {REGISTERED}
        self.held.write(file.sha256, {file.sha256: entry.dumps(), file.sha256 + FILE: raw_file})
        self.waiting.setdefault(partition, Waiting()).put(file.sha256, entry.since, entry.ready)

    def registration(self, file: ParsedFile) -> Output | None:
        """The file's registration in its buckets (None: it has none), to the first
        partition owning some (`registration_step`)."""
        if not file.near_dup.bands:
            return None
        return self.registration_step(BandMessage(sha256=file.sha256, bands=file.near_dup.bands))

    def registration_step(self, message: BandMessage) -> Output:
        """`message` to the first partition owning some of its bands, in partition order:
        each partition is visited once."""
        partition = min(bucket_partition(band, self.partitions) for band in message.bands)
        return Output("files.bands", message.sha256, message, partition=partition)

    async def on_bands(self, value: bytes, key: str | None) -> Result:
        """Enter a file in the buckets it has on this partition. Each file concerned
        hears what `Bucket.register` says: a file it displaced at once; the file itself
        with the rest of its registration, passed on to the next partition owning some
        of its bands, or, from the last, in its `registered` event."""
        message = BandMessage.model_validate_json(value)
        sha, here = message.sha256, _event_partition()
        earlier, later = message.earlier, set(message.later)
        rest: list[str] = []
        changed: dict[str, str] = {}
        result = Result()
        for band in message.bands:
            if bucket_partition(band, self.partitions) != here:
                rest.append(band)
                continue
            bucket = Bucket.loads(self.buckets[band])
            updated, hears = bucket.register(sha)
            if updated != bucket:
                changed[band] = updated.dumps()
            for to, kind, about in hears:
                if to != sha:  # a file `sha` displaced, which owes it an answer
                    event = NearDupEvent(kind=kind, sha256=to, other=about)  # type: ignore[arg-type]
                    result.outputs.append(Output("files.neardup", to, event))
                elif kind == "earlier":
                    earlier = min(earlier or about, about)
                else:  # "later": `sha` waits for the answer of the file it displaced
                    later.add(about)
        # the buckets it changed here in one changelog record, not one each (~6 a file)
        self.buckets.write(f"{sha}@{here}", changed)
        if rest:
            step = BandMessage(sha256=sha, bands=rest, earlier=earlier, later=sorted(later))
            result.outputs.append(self.registration_step(step))
        else:
            done = NearDupEvent(kind="registered", sha256=sha, other=earlier, later=sorted(later))
            result.outputs.append(Output("files.neardup", sha, done))
        return result

    async def on_neardup(self, value: bytes, key: str | None) -> Result:
        event = NearDupEvent.model_validate_json(value)
        if event.kind == "decide":
            assert event.partition is not None
            return await self.decide_partition(event.partition)
        assert event.sha256 is not None
        cluster = self.settled[event.sha256]
        if cluster:  # decided in an earlier batch (or a redelivery)
            if event.kind != "displaced":
                return Result()
            assert event.other is not None  # the newcomer waits for this answer
            reply = NearDupEvent(
                kind="answer", sha256=event.other, other=event.sha256, cluster=cluster
            )
            return Result(outputs=[Output("files.neardup", event.other, reply)])
        raw = self.held[event.sha256]
        entry = HeldFile.loads(raw) if raw else HeldFile(_event_partition(), time.time())
        entry.hear(event)
        self.held[event.sha256] = entry.dumps()
        if (waiting := self.waiting.get(entry.partition)) is not None:
            waiting.update(event.sha256, entry.ready)
        if not entry.ready:
            return Result()
        # a ready file answers a file that displaces it at once; every file it owes on
        # the event that made it ready, or on a redelivery of it (its answers may be
        # lost), and once more when it is decided
        to = [event.other] if event.kind == "displaced" else None
        return Result(outputs=entry.answers(event.sha256, to))

    async def decide_partition(self, partition: int) -> Result:
        """Decide the next chunk of `partition`'s batch: keep or drop each file, and
        while files of the batch remain, ask for the next chunk as one more output, so
        that it is decided once this chunk's outputs are acknowledged: a worker holds
        one chunk of files, not the batch. A chunk is forgotten once its kept files are
        acknowledged on `parsed.files`; a crash before that redelivers the `decide`, and
        the restarted worker, whose index has every file not yet forgotten, decides them
        again, with the same keys."""
        chunk = self.next_chunk(partition)
        result = Result()
        outcomes: list[Outcome] = []
        decided: list[str] = []
        for sha in chunk:
            raw = self.held[sha]
            # forgotten (delivered meanwhile), or decided here, its outputs on their way
            if not raw or sha in self.deciding:
                continue
            entry = HeldFile.loads(raw)
            if not entry.ready:  # it heard of a file to wait for since it joined the batch
                self.waiting.setdefault(partition, Waiting()).put(sha, entry.since, False)
                continue
            file = ParsedFile.model_validate_json(self.held[sha + FILE])
            duplicate_of = decide(entry.heard)
            reason = "near_duplicate" if duplicate_of else None
            outcomes.append(Outcome.of(file, reason))
            # the decision is a step of the file's own trace
            with decided_span(entry.trace, sha, reason):
                trace = tracing.traceparent()
            if reason:
                result.drop(reason)
            else:
                near_dup = file.near_dup.model_copy(update={"cluster": sha})
                kept = file.model_copy(update={"near_dup": near_dup})
                result.outputs.append(Output("parsed.files", sha, kept, trace))
            self.settled[sha] = duplicate_of or sha
            # answered when it got ready; again, as that event may be redelivered once it
            # is settled (a crash), when its answers are lost
            result.outputs.extend(entry.answers(sha))
            decided.append(sha)
            self.deciding.add(sha)
        if outcomes:
            await asyncio.to_thread(record_outcomes, self.ctx.engine, outcomes)
        if self.batches.get(partition):
            result.outputs.append(decide_output(partition))
        result.count("files", len(decided))
        event = faust.current_event()
        result.delivered.append(lambda: self.forget(decided, event))
        return result

    def next_chunk(self, partition: int) -> list[str]:
        """The next at most `neardup_decide_chunk` files of `partition`'s batch, taken
        off it. A `decide` that finds no batch begins one: the files waiting then that
        are ready, in sha256 order (those held later, or not ready, wait for the next
        batch), known without reading the table (`Waiting`)."""
        self.ensure_indexed()
        batch = self.batches.get(partition)
        if not batch:
            waiting = self.waiting.get(partition)
            batch = self.batches[partition] = waiting.take_ready() if waiting else []
        chunk = batch[: self.settings.neardup_decide_chunk]
        del batch[: len(chunk)]
        return chunk

    def forget(self, decided: list[str], event: Any) -> None:
        """Delete decided files from `neardup-held`. A deletion's changelog partition is
        the current event's, which Faust holds only by a weak reference: `event` keeps it
        alive until the outputs are acknowledged (under load, after the stream moved on).
        A file decided twice (after a rebalance) may be forgotten already."""
        for sha in decided:
            self.deciding.discard(sha)
            if sha in self.held:
                self.held.write(sha, {sha: None, sha + FILE: None})

    # ------------------------------------------------------------------ the timer

    def owned(self) -> frozenset[int]:
        return frozenset(
            tp.partition
            for tp in self.ctx.app.assignor.assigned_actives()
            if tp.topic == self.neardup_topic
        )

    def ensure_indexed(self) -> frozenset[int]:
        """The partitions owned now, `waiting` and `batches` indexed for them: rebuilt
        from the table after a rebalance (the partitions owned, or what is in them, may
        have changed), once it is over (tables recovered)."""
        owned, app = self.owned(), self.ctx.app
        generation = (owned, app.rebalancing_count)
        if generation != self.indexed and not (app.rebalancing or app.in_recovery):
            self.reindex(owned)
            self.indexed = generation
        return owned

    def busy(self) -> bool:
        """Whether an owned partition holds files not decided yet, ready or not."""
        owned = self.ensure_indexed()
        return any(self.waiting.get(p) or self.batches.get(p) for p in owned)

    def owned_ready(self) -> dict[int, float]:
        """Owned partitions with ready files waiting → when the oldest was first held:
        those a `decide` would decide files of (files not ready wait anyway)."""
        owned = self.ensure_indexed()
        return {
            p: min(files.ready.values())
            for p, files in self.waiting.items()
            if p in owned and files.ready
        }

    def reindex(self, owned: frozenset[int]) -> None:
        """Rebuild `waiting` from the table (after a rebalance or recovery), batches
        under way included: every held file not yet forgotten, decided or not (a file
        is settled before its outputs are acknowledged; deciding it again is the same),
        but those this worker decided (`deciding`); each ready or not, as its header
        says."""
        waiting: dict[int, Waiting] = {}
        headers: dict[str, HeldFile] = {}
        filed: set[str] = set()  # whose candidate came (events may come before)
        for key, raw in self.held.items():
            if key.endswith(FILE):
                filed.add(key.removesuffix(FILE))
            else:
                headers[key] = HeldFile.loads(raw)
        for sha, entry in headers.items():
            if entry.partition in owned and sha in filed and sha not in self.deciding:
                waiting.setdefault(entry.partition, Waiting()).put(sha, entry.since, entry.ready)
        self.waiting = waiting
        self.batches = {}

    async def ask_to_decide(self) -> None:
        """Ask each owned partition with ready files to decide, once everything upstream
        is drained or a ready file waited `neardup_max_hold_s` (a file not ready is
        decided in the batch after it gets ready: deciding before does nothing for it)."""
        waiting = self.owned_ready()
        if not waiting:
            self.drain.reset()
            return
        settled = await self.drain.observe()
        max_hold = self.settings.neardup_max_hold_s
        overdue = held_too_long(waiting.values(), time.time(), max_hold)
        if not settled and not overdue:
            return
        if overdue:
            log.info("near-dup: files held over %.0f s, deciding now", max_hold)
        self.drain.reset()
        for partition in sorted(waiting):
            await self.ctx.send("neardup", decide_output(partition))
        log.info("near-dup: deciding partitions %s", sorted(waiting))


def attach(ctx: StageContext) -> None:
    NearDup(ctx).attach()
