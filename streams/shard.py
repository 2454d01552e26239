"""Shard stage: `instruction.samples` → zstd JSONL shards in the store → `training.shards`.

Samples are first staged in the ledger (keyed by sample id, so a redelivered or repeated
sample is staged once). A shard is sealed from the pending samples of one
(dataset, stage, split) in sample-id order once N are pending, or with whatever is
pending when the stage goes idle. Sealing writes the shard object under a deterministic
name, then commits the membership in one transaction; a crash in between just rewrites
the same name on the next try. `TrainingShard` events are published from the ledger
after the commit (and re-published after a crash), so none is ever lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import Any

import zstandard
from sqlalchemy import Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exforge.db import Sample, Shard
from exforge.store import ObjectStore, sha256_hex
from exforge.telemetry import SHARDS_WRITTEN
from schemas.records import InstructionSample, TrainingShard
from streams.stage import Output, Result, StageContext, attach_stage

log = logging.getLogger("exforge.shard")

VALIDATION_FRACTION = 0.02
ZSTD_LEVEL = 10


def split_for(sample_id: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """Stable train/validation assignment from the sample id's hash."""
    bucket = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"


def shard_prefix(dataset: str, stage: int, split: str) -> str:
    return f"shards/{dataset}/stage{stage}/{split}"


def shard_key(dataset: str, stage: int, split: str, index: int) -> str:
    return f"{shard_prefix(dataset, stage, split)}/{index:05d}.jsonl.zst"


def encode_shard(lines: list[str]) -> bytes:
    """Deterministic zstd JSONL: the same samples always give the same bytes."""
    body = "".join(line + "\n" for line in lines).encode()
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)


def decode_shard(data: bytes) -> list[dict[str, Any]]:
    body = zstandard.ZstdDecompressor().decompress(data)
    return [json.loads(line) for line in body.decode().splitlines() if line]


def sharegpt_line(sample: InstructionSample) -> str:
    return json.dumps(sample.sharegpt(), ensure_ascii=False, sort_keys=True)


def stage_sample(engine: Engine, dataset: str, sample: InstructionSample) -> bool:
    """Stage a sample for sharding; False when it was staged before (a duplicate)."""
    row = Sample(
        sample_id=sample.sample_id,
        dataset=dataset,
        stage=sample.meta.stage,
        split=split_for(sample.sample_id),
        kind=sample.meta.kind,
        payload=sharegpt_line(sample),
    )
    try:
        with Session(engine) as session, session.begin():
            if session.get(Sample, sample.sample_id) is not None:
                return False
            session.add(row)
    except IntegrityError:  # a concurrent worker staged it first
        return False
    return True


def pending_groups(engine: Engine, dataset: str, minimum: int) -> list[tuple[int, str]]:
    """(stage, split) groups of `dataset` with at least `minimum` unsealed samples."""
    query = (
        select(Sample.stage, Sample.split)
        .where(Sample.dataset == dataset, Sample.shard_index.is_(None))
        .group_by(Sample.stage, Sample.split)
        .having(func.count() >= minimum)
        .order_by(Sample.stage, Sample.split)
    )
    with Session(engine) as session:
        return [(stage, split) for stage, split in session.execute(query)]


def seal_group(
    engine: Engine,
    store: ObjectStore,
    dataset: str,
    stage: int,
    split: str,
    size: int,
    minimum: int,
) -> int:
    """Seal one shard of up to `size` pending samples of a group, if at least `minimum`
    are pending; return its size (0: nothing sealed)."""
    with Session(engine) as session, session.begin():
        rows = session.scalars(
            select(Sample)
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
        if len(rows) < max(minimum, 1):
            return 0
        last = session.scalar(
            select(func.max(Shard.shard_index)).where(
                Shard.dataset == dataset, Shard.stage == stage, Shard.split == split
            )
        )
        index = 0 if last is None else last + 1
        key = shard_key(dataset, stage, split, index)
        data = encode_shard([row.payload for row in rows])
        store.put(key, data)
        shard = Shard(
            dataset=dataset,
            stage=stage,
            split=split,
            shard_index=index,
            key=key,
            samples=len(rows),
            tokens=0,
            sha256=sha256_hex(data),
            published=False,
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


def seal(engine: Engine, store: ObjectStore, dataset: str, size: int, flush: bool) -> int:
    """Seal every full shard (and, with `flush`, the partial ones); return how many."""
    sealed = 0
    minimum = 1 if flush else size
    for stage, split in pending_groups(engine, dataset, minimum):
        while seal_group(engine, store, dataset, stage, split, size, minimum):
            sealed += 1
    return sealed


def manifest(engine: Engine, dataset: str, stage: int, split: str) -> dict[str, Any]:
    with Session(engine) as session:
        shards = session.scalars(
            select(Shard)
            .where(Shard.dataset == dataset, Shard.stage == stage, Shard.split == split)
            .order_by(Shard.shard_index)
        ).all()
        entries = [
            {
                "index": s.shard_index,
                "key": s.key,
                "samples": s.samples,
                "tokens": s.tokens,
                "sha256": s.sha256,
            }
            for s in shards
        ]
    return {
        "dataset": dataset,
        "stage": stage,
        "split": split,
        "format": "sharegpt-jsonl-zstd",
        "samples": sum(e["samples"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "shards": entries,
    }


def write_manifest(
    engine: Engine, store: ObjectStore, dataset: str, stage: int, split: str
) -> None:
    body = json.dumps(manifest(engine, dataset, stage, split), indent=2, sort_keys=True)
    store.put(f"{shard_prefix(dataset, stage, split)}/manifest.json", body.encode())


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
                    manifest_key=f"{shard_prefix(row.dataset, row.stage, row.split)}/manifest.json",
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


def pending_samples(engine: Engine) -> int:
    with Session(engine) as session:
        return (
            session.scalar(
                select(func.count()).select_from(Sample).where(Sample.shard_index.is_(None))
            )
            or 0
        )


def attach(ctx: StageContext) -> None:
    settings = ctx.settings
    publishing = asyncio.Lock()

    def handle(value: bytes, key: str | None) -> Result:
        sample = InstructionSample.model_validate_json(value)
        result = Result()
        if not stage_sample(ctx.engine, settings.dataset, sample):
            result.drop("duplicate_sample")
        seal(ctx.engine, ctx.store, settings.dataset, settings.shard_samples, flush=False)
        return result

    async def publish() -> None:
        async with publishing:
            for shard_id, event in await asyncio.to_thread(unpublished, ctx.engine):
                await ctx.send(
                    "shard", Output("training.shards", f"{event.dataset}/{event.stage}", event)
                )
                await asyncio.to_thread(mark_published, ctx.engine, shard_id)

    attach_stage(ctx, "shard", "instruction.samples", handle, after=publish)

    @ctx.app.timer(interval=1.0, name="shard-idle-flush")
    async def flush_when_idle() -> None:
        quiet_for = time.monotonic() - ctx.last_activity.get("shard", 0.0)
        if quiet_for < settings.idle_seconds:
            return
        try:
            sealed = await asyncio.to_thread(
                seal, ctx.engine, ctx.store, settings.dataset, settings.shard_samples, True
            )
            if sealed:
                ctx.touch("shard")
            await publish()
        except Exception:  # the store or database may be back on the next tick
            log.exception("shard: idle flush failed; retrying")
