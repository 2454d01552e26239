"""What every source crawl shares: its summary, progress events, output sink, the
incremental table of seen releases, and the error for a missing base-URL setting."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import SeenRelease
from schemas.records import SourceRequest
from streams.sources.http import PoliteClient


class MissingSetting(ValueError):
    """A base URL the source needs is not configured."""


@dataclass
class Summary:
    """What a crawl did; printed at the end (`--json` prints this as JSON)."""

    listed: int = 0
    pages: int = 0
    fetched: int = 0
    requested: int = 0
    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def as_dict(self, http: PoliteClient | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "listed": self.listed,
            "pages": self.pages,
            "fetched": self.fetched,
            "requested": self.requested,
            "bytes": self.bytes,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "failed": sum(self.failed.values()),
            "failed_by_reason": dict(self.failed),
            "errors": self.errors[:50],
        }
        if http is not None:
            data["http"] = {
                "requests": http.stats.requests,
                "not_modified": http.stats.not_modified,
                "retries": dict(http.stats.retries),
                "throttled": http.stats.throttled,
                "encodings": dict(http.stats.encodings),
                "budget_waits": http.limiter.waits,
            }
        return data


Progress = Callable[[str], None]  # called with "listed", "fetched", "skipped", "failed"
Sink = Callable[[SourceRequest], Awaitable[None]]


class SeenReleases:
    """The incremental-crawl table: what was requested, with which outer checksum."""

    def __init__(self, engine: Engine, kind: str) -> None:
        self.engine = engine
        self.kind = kind

    def get(self, package: str, version: str) -> SeenRelease | None:
        with Session(self.engine) as session:
            return session.scalar(
                select(SeenRelease).where(
                    SeenRelease.kind == self.kind,
                    SeenRelease.package == package,
                    SeenRelease.version == version,
                )
            )

    def mark(
        self, package: str, version: str, checksum: str | None, retirement: str | None = None
    ) -> None:
        with Session(self.engine) as session, session.begin():
            session.merge(
                SeenRelease(
                    kind=self.kind,
                    package=package,
                    version=version,
                    checksum=checksum,
                    retired=retirement is not None,
                    retirement=retirement,
                )
            )
