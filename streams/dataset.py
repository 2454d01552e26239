"""The dataset the pipeline produced: statistics, samples and export.

Everything is read from the ledger database (staged samples keep their ShareGPT line).
Exports are in the curriculum order of the shards (`schemas.shards.curriculum`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from exforge.core.db import FileOutcome, LicenseOutcome, Package, Sample, SampleDrop, Shard
from schemas.records import SampleMeta
from schemas.shards import curriculum, parquet_bytes

ExportFormat = Literal["sharegpt", "parquet"]
SPLITS = ("train", "validation")


def stats(engine: Engine) -> dict[str, Any]:
    """Packages, files kept and dropped by reason, redactions in the kept files, samples by
    kind/stage/split/difficulty/license/source, samples dropped by reason, Tekken tokens,
    shards."""
    with Session(engine) as session:

        def count(model: type, *where: Any) -> int:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

        def grouped(*columns: Any, where: Any = True) -> list[tuple[Any, ...]]:
            query = select(*columns, func.count()).where(where).group_by(*columns)
            return [tuple(row) for row in session.execute(query.order_by(*columns))]

        def tokens_by(column: Any) -> dict[str, int]:
            query = select(column, func.sum(Sample.tokens)).group_by(column).order_by(column)
            return {str(key): int(n or 0) for key, n in session.execute(query)}

        dropped = dict(grouped(FileOutcome.reason, where=FileOutcome.kept.is_(False)))
        drops = dict(grouped(SampleDrop.reason))
        redactions: dict[str, int] = {}
        redacted_files = 0
        kept_redactions = select(FileOutcome.redactions).where(
            FileOutcome.kept.is_(True), FileOutcome.redactions.is_not(None)
        )
        for counts in session.scalars(kept_redactions):
            redacted_files += any(counts.values())
            for kind, n in counts.items():
                redactions[kind] = redactions.get(kind, 0) + n
        shard_samples = session.scalar(select(func.coalesce(func.sum(Shard.samples), 0)))
        shard_tokens = session.scalar(select(func.coalesce(func.sum(Shard.tokens), 0)))
        return {
            "packages": count(Package),
            "files": {
                "seen": count(FileOutcome),
                "kept": count(FileOutcome, FileOutcome.kept.is_(True)),
                "dropped": sum(dropped.values()),
                "dropped_by_reason": dropped,
                # secrets and PII replaced in the kept files
                "redacted": redacted_files,
                "redactions_by_kind": dict(sorted(redactions.items())),
            },
            "samples": {
                "total": count(Sample),
                "by_kind": dict(grouped(Sample.kind)),
                "by_stage": {str(stage): n for stage, n in grouped(Sample.stage)},
                "by_split": dict(grouped(Sample.split)),
                "by_difficulty": {str(d): n for d, n in grouped(Sample.difficulty)},
                "by_license": {str(lic): n for lic, n in grouped(Sample.license)},
                "by_source": {str(src): n for src, n in grouped(Sample.source_id)},
                "pending": count(Sample, Sample.shard_index.is_(None)),
                "dropped": sum(drops.values()),
                "dropped_by_reason": drops,
                "dropped_by_kind": dict(grouped(SampleDrop.kind)),
            },
            "tokens": {
                "samples": int(session.scalar(select(func.coalesce(func.sum(Sample.tokens), 0)))),
                "in_shards": int(shard_tokens or 0),
                "by_kind": tokens_by(Sample.kind),
                "by_stage": tokens_by(Sample.stage),
            },
            "licenses": {
                "allowed": count(LicenseOutcome, LicenseOutcome.allowed.is_(True)),
                "withheld": count(LicenseOutcome, LicenseOutcome.allowed.is_(False)),
                "withheld_by_reason": dict(
                    grouped(LicenseOutcome.reason, where=LicenseOutcome.allowed.is_(False))
                ),
            },
            "shards": {
                "total": count(Shard),
                "samples": int(shard_samples or 0),
                "unpublished": count(Shard, Shard.published.is_(False)),
            },
        }


def rows(
    engine: Engine, dataset: str, split: str | None = None, kind: str | None = None
) -> list[dict]:
    """Staged samples of a dataset as ShareGPT rows, by id."""
    query = select(Sample.payload).where(Sample.dataset == dataset).order_by(Sample.sample_id)
    if split is not None:
        query = query.where(Sample.split == split)
    if kind is not None:
        query = query.where(Sample.kind == kind)
    with Session(engine) as session:
        return [json.loads(payload) for payload in session.scalars(query)]


def pick(engine: Engine, dataset: str, kind: str, n: int) -> list[dict]:
    """`n` samples of a kind, spread over the id space (stable)."""
    found = rows(engine, dataset, kind=kind)
    if len(found) <= n:
        return found
    step = len(found) / n
    return [found[int(i * step)] for i in range(n)]


def uniform(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every meta field present (null when unset): one schema for readers."""
    return {**row, "meta": SampleMeta.model_validate(row["meta"]).model_dump()}


def export(engine: Engine, dataset: str, out: Path, fmt: ExportFormat) -> dict[str, int]:
    """Write `train` and `validation` files (ShareGPT JSONL or Parquet) in curriculum
    order into `out` (an empty split writes no file); return samples per file name."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        ordered = [uniform(row) for row in curriculum(rows(engine, dataset, split))]
        if not ordered:
            continue
        if fmt == "parquet":
            name = f"{split}.parquet"
            (out / name).write_bytes(parquet_bytes(ordered))
        else:
            name = f"{split}.jsonl"
            lines = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in ordered)
            (out / name).write_text("".join(lines), encoding="utf-8")
        written[name] = len(ordered)
    return written
