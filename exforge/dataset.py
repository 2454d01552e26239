"""Dataset statistics, read from the ledger database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from exforge.db import FileOutcome, LicenseOutcome, Package, Sample, Shard


def stats(engine: Engine) -> dict[str, Any]:
    """Packages, files kept and dropped by reason, samples by kind/stage/split, shards."""
    with Session(engine) as session:

        def count(model: type, *where: Any) -> int:
            return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

        def grouped(*columns: Any, where: Any = True) -> list[tuple[Any, ...]]:
            query = select(*columns, func.count()).where(where).group_by(*columns)
            return [tuple(row) for row in session.execute(query.order_by(*columns))]

        dropped = dict(grouped(FileOutcome.reason, where=FileOutcome.kept.is_(False)))
        shard_samples = session.scalar(select(func.coalesce(func.sum(Shard.samples), 0)))
        return {
            "packages": count(Package),
            "files": {
                "seen": count(FileOutcome),
                "kept": count(FileOutcome, FileOutcome.kept.is_(True)),
                "dropped": sum(dropped.values()),
                "dropped_by_reason": dropped,
            },
            "samples": {
                "total": count(Sample),
                "by_kind": dict(grouped(Sample.kind)),
                "by_stage": {str(stage): n for stage, n in grouped(Sample.stage)},
                "by_split": dict(grouped(Sample.split)),
                "pending": count(Sample, Sample.shard_index.is_(None)),
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
