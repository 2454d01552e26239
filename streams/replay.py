"""`exforge replay raw`: send `raw.packages` again from the ledger and the stored archives.

After the broker lost its data (or to re-drive the pipeline from the start), every
package the ingest stage recorded is sent again: its original record when the ledger has
it, else one rebuilt from the ledger's columns. An archive missing from the store, or
whose bytes no longer have the recorded sha256, is reported and not sent. Every stage
after ingest derives its keys from content, so the re-driven pipeline rewrites the same
rows and the same shards: nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import Package
from exforge.core.store import ObjectNotFound, ObjectStore, sha256_hex
from schemas.records import RawPackage


@dataclass
class Replay:
    packages: list[RawPackage] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # source ids whose archive is gone
    changed: list[str] = field(default_factory=list)  # archive bytes differ from sha256


def package_record(row: Package) -> RawPackage:
    if row.record:
        return RawPackage.model_validate_json(row.record)
    return RawPackage(
        source_id=row.source_id,
        kind=row.kind,  # type: ignore[arg-type]
        name=row.name,
        version=row.version,
        license=row.license,
        archive_key=row.archive_key,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
    )


def raw_replay(engine: Engine, store: ObjectStore) -> Replay:
    """The `raw.packages` records to send again, in source-id order, archives checked."""
    replay = Replay()
    with Session(engine) as session:
        rows = session.scalars(select(Package).order_by(Package.source_id)).all()
        records = [package_record(row) for row in rows]
    for record in records:
        try:
            data = store.get(record.archive_key)
        except ObjectNotFound:
            replay.missing.append(record.source_id)
            continue
        if sha256_hex(data) != record.sha256:
            replay.changed.append(record.source_id)
            continue
        replay.packages.append(record)
    return replay
