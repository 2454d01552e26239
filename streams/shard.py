"""Shard stage: `instruction.samples` → zstd JSONL shards in the store → `training.shards`.

Samples are first staged in the ledger (keyed by sample id, so a redelivered or repeated
sample is staged once) with their Tekken token count, difficulty, license and source.
Shards are sealed when the whole pipeline is drained (every stage input consumed and
committed, seen over several checks): then the pending samples of each (dataset, stage,
split), in sample-id order, are cut into shards of N samples or T tokens
(`shard_samples`, `shard_tokens`), the last one partial. The same samples therefore make
the same shards whatever the number of workers and whenever they arrived. Under an
inflow that never drains, full shards are sealed once a pending sample has waited
`shard_max_hold_s`. Inside a shard samples run easy → hard (difficulty, then
curriculum position, then id). An optional
Parquet copy sits next to each shard; each group's manifest lists, per shard, its key,
sha256, sample and token counts, difficulty histogram and kinds. Sealing writes the
shard object under a deterministic name, then commits the membership and the shard's row
(with those histograms, so a manifest reads shard rows, never samples) in one
transaction; a crash in between just rewrites the same name on the next try.
`TrainingShard` events are published from the ledger after the commit (and
re-published after a crash), so none is ever lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exforge.core.db import Sample, Shard
from exforge.core.kafka import ANSWER_TIMEOUT_S, DrainWatch
from exforge.core.store import ObjectStore, sha256_hex
from exforge.core.telemetry import SHARDS_WRITTEN
from schemas.catalogue import STAGE_INPUTS
from schemas.records import InstructionSample, TrainingShard
from schemas.shards import (
    FORMAT,
    VALIDATION_FRACTION,
    curriculum_key,
    encode_shard,
    manifest_key,
    parquet_bytes,
    parquet_key,
    shard_key,
    sharegpt_line,
    split_for,
)
from streams.generators.tokens import token_counter
from streams.stage import Failure, Output, Result, StageContext, attach_batch_stage

log = logging.getLogger("exforge.shard")


def sample_row(
    dataset: str, sample: InstructionSample, tokens: int, validation_fraction: float
) -> dict[str, Any]:
    """The sample's `Sample` row, as the values of a bulk insert."""
    refs = sample.meta.source_refs
    return {
        "sample_id": sample.sample_id,
        "dataset": dataset,
        "stage": sample.meta.stage,
        "split": split_for(sample.sample_id, validation_fraction),
        "kind": sample.meta.kind,
        "payload": sharegpt_line(sample),
        "difficulty": sample.meta.difficulty,
        "tokens": tokens,
        "license": sample.meta.license,
        "source_id": refs[0].source_id if refs else None,
        "position": sample.meta.position,
    }


def stage_sample(
    engine: Engine,
    dataset: str,
    sample: InstructionSample,
    tokens: int = 0,
    validation_fraction: float = VALIDATION_FRACTION,
) -> bool:
    """Stage a sample for sharding; False when it was staged before (a duplicate)."""
    return bool(stage_samples(engine, dataset, [(sample, tokens)], validation_fraction))


def stage_samples(
    engine: Engine,
    dataset: str,
    samples: list[tuple[InstructionSample, int]],
    validation_fraction: float = VALIDATION_FRACTION,
) -> set[str]:
    """Stage (sample, token count) pairs in one transaction; the ids staged now (the
    others were staged before, or repeat an earlier one of `samples`)."""
    ids = [sample.sample_id for sample, _ in samples]
    try:
        with Session(engine) as session, session.begin():
            staged = set(session.scalars(select(Sample.sample_id).where(Sample.sample_id.in_(ids))))
            fresh: set[str] = set()
            rows = []
            for sample, tokens in samples:
                if sample.sample_id in staged or sample.sample_id in fresh:
                    continue
                rows.append(sample_row(dataset, sample, tokens, validation_fraction))
                fresh.add(sample.sample_id)
            if rows:  # one bulk insert, not one object per row through the unit of work
                session.execute(insert(Sample), rows)
            return fresh
    except IntegrityError:  # a concurrent worker staged some first: one by one
        if len(samples) == 1:
            return set()
        return {
            sid
            for pair in samples
            for sid in stage_samples(engine, dataset, [pair], validation_fraction)
        }


def pending_groups(
    engine: Engine, dataset: str, minimum: int, max_tokens: int | None = None
) -> list[tuple[int, str]]:
    """(stage, split) groups of `dataset` with at least `minimum` unsealed samples (or,
    given `max_tokens`, that many tokens)."""
    full = func.count() >= minimum
    if max_tokens is not None:
        full = full | (func.sum(Sample.tokens) >= max_tokens)
    query = (
        select(Sample.stage, Sample.split)
        .where(Sample.dataset == dataset, Sample.shard_index.is_(None))
        .group_by(Sample.stage, Sample.split)
        .having(full)
        .order_by(Sample.stage, Sample.split)
    )
    with Session(engine) as session:
        return [(stage, split) for stage, split in session.execute(query)]


# What sealing reads of a pending sample: plain rows, not ORM objects (their identity
# map and attribute instrumentation cost more than the query)
SEALED_COLUMNS = (
    Sample.sample_id,
    Sample.stage,
    Sample.difficulty,
    Sample.position,
    Sample.tokens,
    Sample.kind,
    Sample.payload,
)
SealedRow = Row[tuple[str, int, int, int | None, int, str, str]]


def take(rows: list[SealedRow], max_tokens: int | None) -> list[SealedRow]:
    """The leading rows up to and including the one that reaches `max_tokens`."""
    if max_tokens is None:
        return rows
    total = 0
    for count, row in enumerate(rows, start=1):
        total += row.tokens
        if total >= max_tokens:
            return rows[:count]
    return rows


def in_curriculum_order(rows: list[SealedRow]) -> list[SealedRow]:
    return sorted(
        rows, key=lambda r: curriculum_key(r.stage, r.difficulty, r.position, r.sample_id)
    )


def seal_group(
    engine: Engine,
    store: ObjectStore,
    dataset: str,
    stage: int,
    split: str,
    size: int,
    minimum: int,
    max_tokens: int | None = None,
    parquet: bool = False,
) -> int:
    """Seal one shard of up to `size` pending samples (and up to `max_tokens` tokens) of a
    group, if at least `minimum` are pending (or the token limit is reached); return its
    size (0: nothing sealed)."""
    with Session(engine) as session, session.begin():
        rows = session.execute(
            select(*SEALED_COLUMNS)
            .where(
                Sample.dataset == dataset,
                Sample.stage == stage,
                Sample.split == split,
                Sample.shard_index.is_(None),
            )
            .order_by(Sample.sample_id)
            .limit(size)
            .with_for_update()
        ).all()
        rows = take(list(rows), max_tokens)
        tokens = sum(row.tokens for row in rows)
        if not rows or (len(rows) < minimum and (max_tokens is None or tokens < max_tokens)):
            return 0
        last = session.scalar(
            select(func.max(Shard.shard_index)).where(
                Shard.dataset == dataset, Shard.stage == stage, Shard.split == split
            )
        )
        index = 0 if last is None else last + 1
        key = shard_key(dataset, stage, split, index)
        ordered = in_curriculum_order(rows)
        data = encode_shard([row.payload for row in ordered])
        store.put(key, data)
        if parquet:
            parquet_data = parquet_bytes([json.loads(row.payload) for row in ordered])
            store.put(parquet_key(key), parquet_data)
        shard = Shard(
            dataset=dataset,
            stage=stage,
            split=split,
            shard_index=index,
            key=key,
            samples=len(rows),
            tokens=tokens,
            sha256=sha256_hex(data),
            published=False,
            difficulties=histogram([row.difficulty for row in rows]),
            kinds=histogram([row.kind for row in rows]),
        )
        session.add(shard)
        session.execute(
            update(Sample)
            .where(Sample.sample_id.in_([row.sample_id for row in rows]))
            .values(shard_index=index)
        )
    write_manifest(engine, store, dataset, stage, split)
    SHARDS_WRITTEN.labels(dataset, str(stage), split).inc()
    return len(rows)


def seal(
    engine: Engine,
    store: ObjectStore,
    dataset: str,
    size: int,
    flush: bool,
    max_tokens: int | None = None,
    parquet: bool = False,
) -> int:
    """Seal every full shard (and, with `flush`, the partial ones); return how many."""
    sealed = 0
    minimum = 1 if flush else size
    for stage, split in pending_groups(engine, dataset, minimum, max_tokens):
        while seal_group(engine, store, dataset, stage, split, size, minimum, max_tokens, parquet):
            sealed += 1
    return sealed


def histogram(values: list[Any]) -> dict[str, int]:
    """How many of each value, keyed by its text, in key order: a manifest histogram."""
    return dict(sorted(Counter(str(value) for value in values).items()))


def add_histograms(histograms: list[dict[str, int]]) -> dict[str, int]:
    """The sum of manifest histograms (a group's, from its shards'), in key order."""
    total: Counter[str] = Counter()
    for counts in histograms:
        total.update(counts)
    return dict(sorted(total.items()))


def manifest(engine: Engine, dataset: str, stage: int, split: str) -> dict[str, Any]:
    """The group's shards with their counts, histograms and checksums, from its shard rows
    alone (rewritten at every seal: its cost grows with the shards, not the samples)."""
    group = (Shard.dataset == dataset, Shard.stage == stage, Shard.split == split)
    with Session(engine) as session:
        shards = session.scalars(select(Shard).where(*group).order_by(Shard.shard_index)).all()
    entries = [
        {
            "index": s.shard_index,
            "key": s.key,
            "samples": s.samples,
            "tokens": s.tokens,
            "sha256": s.sha256,
            "difficulty": s.difficulties,
            "kinds": s.kinds,
        }
        for s in shards
    ]
    return {
        "dataset": dataset,
        "stage": stage,
        "split": split,
        "format": FORMAT,
        "samples": sum(e["samples"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "difficulty": add_histograms([s.difficulties for s in shards]),
        "kinds": add_histograms([s.kinds for s in shards]),
        "shards": entries,
    }


def write_manifest(
    engine: Engine, store: ObjectStore, dataset: str, stage: int, split: str
) -> None:
    body = json.dumps(manifest(engine, dataset, stage, split), indent=2, sort_keys=True)
    store.put(manifest_key(dataset, stage, split), body.encode())


def unpublished(engine: Engine) -> list[tuple[int, TrainingShard]]:
    with Session(engine) as session:
        rows = session.scalars(
            select(Shard).where(Shard.published.is_(False)).order_by(Shard.id)
        ).all()
        return [
            (
                row.id,
                TrainingShard(
                    dataset=row.dataset,
                    stage=row.stage,
                    split=row.split,  # type: ignore[arg-type]
                    index=row.shard_index,
                    key=row.key,
                    manifest_key=manifest_key(row.dataset, row.stage, row.split),
                    samples=row.samples,
                    tokens=row.tokens,
                    sha256=row.sha256,
                ),
            )
            for row in rows
        ]


def mark_published(engine: Engine, shard_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Shard).where(Shard.id == shard_id).values(published=True))


# asked every second by each worker process: answered from `ix_samples_pending` alone
OLDEST_PENDING = select(func.min(Sample.recorded_at)).where(Sample.shard_index.is_(None))


def oldest_pending(engine: Engine) -> datetime | None:
    """When the oldest sample still waiting for a shard was staged (None: none waits)."""
    with Session(engine) as session:
        oldest = session.scalar(OLDEST_PENDING)
    if oldest is not None and oldest.tzinfo is None:  # SQLite forgets the zone
        oldest = oldest.replace(tzinfo=UTC)
    return oldest


def utcnow() -> datetime:
    return datetime.now(UTC)


def pending_samples(engine: Engine) -> int:
    with Session(engine) as session:
        return (
            session.scalar(
                select(func.count()).select_from(Sample).where(Sample.shard_index.is_(None))
            )
            or 0
        )


BATCH_SAMPLES = 256  # samples staged in one transaction
DRAINED_CHECKS = 4  # consecutive drained observations before shards are sealed


def attach(ctx: StageContext) -> None:
    settings = ctx.settings
    publishing = asyncio.Lock()

    count = token_counter(settings.tokenizer_path)

    def sealing(flush: bool) -> int:
        return seal(
            ctx.engine,
            ctx.store,
            settings.dataset,
            settings.shard_samples,
            flush,
            settings.shard_tokens,
            settings.shard_parquet,
        )

    def handle(items: list[tuple[bytes, str | None]]) -> list[Result]:
        results = [Result() for _ in items]
        staging: list[tuple[int, InstructionSample, int]] = []
        for index, (value, _) in enumerate(items):
            try:
                sample = InstructionSample.model_validate_json(value)
            except ValidationError as exc:
                results[index].failures.append(Failure.from_exception(exc))
                continue
            tokens = sample.tokens
            if tokens is None:  # produced elsewhere than the instruct stage
                tokens = count(sample.sharegpt()["conversations"])
            staging.append((index, sample, tokens))
        fresh = stage_samples(
            ctx.engine,
            settings.dataset,
            [(sample, tokens) for _, sample, tokens in staging],
            settings.validation_fraction,
        )
        for index, sample, _ in staging:
            results[index].count("samples")
            if sample.sample_id in fresh:
                fresh.discard(sample.sample_id)  # a repeat within the batch is a duplicate
            else:
                results[index].drop("duplicate_sample")
        return results

    async def publish() -> None:
        """Announce sealed shards; one the broker does not acknowledge in time stays
        unpublished and is announced again on a later tick (consumers read shards from
        the store, an announcement twice is harmless)."""
        async with publishing:
            for shard_id, event in await asyncio.to_thread(unpublished, ctx.engine):
                output = Output("training.shards", f"{event.dataset}/{event.stage}", event)
                await asyncio.wait_for(ctx.send("shard", output), ANSWER_TIMEOUT_S)
                await asyncio.to_thread(mark_published, ctx.engine, shard_id)

    attach_batch_stage(ctx, "shard", "instruction.samples", handle, max_batch=BATCH_SAMPLES)

    # sealing waits a little longer than a near-dup decision, which releases a batch; a
    # process at work does not ask the broker (a look a second in each process cost ~2 %
    # of the workers' CPU at 300 hex-scale packages)
    drain = DrainWatch(
        settings,
        tuple(STAGE_INPUTS.values()),
        checks=DRAINED_CHECKS,
        watch=ctx.broker,
        holding=ctx.holding_input,
    )

    def seal_now(drained: bool) -> int:
        """Shards sealed: all pending samples when drained, else full shards of samples
        held too long."""
        oldest = oldest_pending(ctx.engine)
        if oldest is None:
            return 0
        if drained:
            return sealing(flush=True)
        max_hold = settings.shard_max_hold_s
        if (utcnow() - oldest).total_seconds() >= max_hold:
            log.info("shard: samples pending over %.0f s, sealing full shards", max_hold)
            return sealing(flush=False)
        return 0

    @ctx.app.timer(interval=1.0, name="shard-seal-and-publish")
    async def seal_and_publish() -> None:
        """Seal what the pipeline's state allows, then publish sealed shards."""
        try:
            drained = await drain.observe()
            if await asyncio.to_thread(seal_now, drained):
                ctx.activity.touch("shard")
                drain.reset()
            await publish()
        except Exception:  # the store or database may be back on the next tick
            log.exception("shard: sealing or publishing failed; retrying")
