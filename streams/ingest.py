"""Ingest stage: `sources.requests` → fetch, verify, license-gate, store → `raw.packages`.

The handler dispatches on `request.kind`: each source has a fetcher (the store when the
CLI already uploaded the archive, else the source's own client) and a check of what the
archive must be (a Hex tarball's format-3 layout and inner checksum, a PDF's header).
Sources collected from third parties (hex, github, book) then pass the license
allow-list; withheld ones are recorded with their reason and not passed on. Local `dir`
projects are the operator's own code and are not gated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exforge.core.db import Package
from exforge.core.settings import Settings
from exforge.core.store import ObjectNotFound, ObjectStore
from schemas.records import RawPackage, SourceRequest
from streams.archives import (
    ArchiveError,
    ChecksumMismatch,
    Limits,
    check_compressed,
    check_sha256,
    read_hex_tarball,
    verify_sha256,
)
from streams.sources.crawl import MissingSetting
from streams.sources.erlterms import parse_metadata
from streams.sources.github import archive_url, auth_headers, fetch_archive
from streams.sources.hex import HexClient
from streams.sources.http import PoliteClient
from streams.sources.licenses import decide, record_decision
from streams.stage import BadMessage, Output, Result, StageContext, attach_stage

__all__ = [
    "ChecksumMismatch",
    "IngestDeps",
    "attach",
    "ingest_request",
    "parse_request",
    "raw_package",
]

GATED_KINDS = frozenset({"hex", "github", "book"})
PDF_MAGIC = b"%PDF-"


class NotAPdf(ArchiveError):
    pass


def parse_request(value: bytes) -> SourceRequest:
    """The request in a message; a ValidationError (dead-lettered) when it is not one."""
    return SourceRequest.model_validate_json(value)


def verify_archive(data: bytes, expected_sha256: str | None) -> str:
    """The archive's sha256, checked against the one the request promised."""
    return verify_sha256(data, expected_sha256)


def raw_package(
    request: SourceRequest,
    archive_key: str,
    sha256: str,
    size: int,
    license: str | None = None,
    learnt: dict[str, Any] | None = None,
) -> RawPackage:
    """The `raw.packages` record: the request's facts plus what ingesting learnt."""
    return RawPackage(
        source_id=request.source_id,
        kind=request.kind,
        name=request.name,
        version=request.version,
        license=license or request.license,
        archive_key=archive_key,
        sha256=sha256,
        size_bytes=size,
        metadata={**request.options, **(learnt or {})},
    )


@dataclass
class IngestDeps:
    """What the ingest handler needs; HTTP clients are made on first use (on the loop
    that uses them)."""

    settings: Settings
    store: ObjectStore
    engine: Engine
    clients: dict[str, PoliteClient] = field(default_factory=dict)

    @property
    def limits(self) -> Limits:
        return Limits.from_settings(self.settings)

    def client(self, kind: str) -> PoliteClient:
        if kind not in self.clients:
            headers = auth_headers(self.settings) if kind == "github" else {}
            self.clients[kind] = PoliteClient(self.settings, headers=headers)
        return self.clients[kind]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()
        self.clients.clear()


async def _fetch_hex(request: SourceRequest, deps: IngestDeps) -> bytes:
    client = HexClient(deps.settings, deps.client("hex"))
    return await client.tarball(request.name, request.version, request.sha256)


async def _fetch_github(request: SourceRequest, deps: IngestDeps) -> bytes:
    url = request.url or archive_url(deps.settings, request.name, request.version)
    return await fetch_archive(deps.client("github"), url, deps.settings)


Fetcher = Callable[[SourceRequest, IngestDeps], Awaitable[bytes]]
FETCHERS: dict[str, Fetcher] = {"hex": _fetch_hex, "github": _fetch_github}


async def fetch(request: SourceRequest, deps: IngestDeps) -> bytes:
    """The archive's bytes, from its source (a request without archive_key)."""
    fetcher = FETCHERS.get(request.kind)
    if fetcher is None:
        raise BadMessage(f"a {request.kind} source request needs archive_key (upload it first)")
    try:
        return await fetcher(request, deps)
    except MissingSetting as exc:
        raise BadMessage(str(exc)) from exc


def check_archive(
    request: SourceRequest, archive: bytes | BinaryIO, size: int, limits: Limits
) -> dict[str, str]:
    """What the archive (`size` bytes, whole or as a stream) must be for its kind;
    metadata learnt on the way."""
    check_compressed(size, limits, f"{request.kind} archive")
    if request.kind == "hex":
        metadata = parse_metadata(read_hex_tarball(archive, limits).metadata_config)
        licenses = metadata.get("licenses") or []
        return {"metadata_licenses": " OR ".join(str(x) for x in licenses)}
    if request.kind == "book":
        header = archive if isinstance(archive, bytes) else archive.read(len(PDF_MAGIC))
        if not header.startswith(PDF_MAGIC):
            raise NotAPdf(f"book {request.source_id} is not a PDF (no %PDF- header)")
    return {}


@dataclass(frozen=True)
class Checked:
    """An archive verified and checked: its sha256, size and what was learnt."""

    sha256: str
    size: int
    learnt: dict[str, str]


def check_stored(request: SourceRequest, deps: IngestDeps) -> Checked:
    """An archive already in the store (uploaded by the CLI), read as a stream: hashed,
    then checked, never held whole."""
    assert request.archive_key is not None
    try:
        sha256, size = deps.store.digest(request.archive_key)
        check_sha256(sha256, request.sha256)
        with deps.store.reader(request.archive_key) as archive:
            learnt = check_archive(request, archive, size, deps.limits)
    except ObjectNotFound:
        raise BadMessage(f"archive {request.archive_key} is not in the store") from None
    return Checked(sha256, size, learnt)


def check_fetched(request: SourceRequest, data: bytes, limits: Limits) -> Checked:
    sha256 = verify_archive(data, request.sha256)
    return Checked(sha256, len(data), check_archive(request, data, len(data), limits))


FETCHED_SUFFIX = {"hex": ".tar", "github": ".tar.gz"}


async def ingest_request(request: SourceRequest, deps: IngestDeps) -> Result:
    """Fetch, verify, gate and store one source; the `raw.packages` record to emit."""
    fetched = request.archive_key is None
    data = await fetch(request, deps) if fetched else b""
    if fetched:
        checked = await asyncio.to_thread(check_fetched, request, data, deps.limits)
    else:
        checked = await asyncio.to_thread(check_stored, request, deps)
    learnt = checked.learnt
    declared = request.license or learnt.get("metadata_licenses") or None
    license_label = declared
    if request.kind in GATED_KINDS:
        decision = decide(declared, deps.settings.license_allow)
        await asyncio.to_thread(
            record_decision, deps.engine, request.source_id, request.kind, request.name, decision
        )
        if not decision.allowed:
            return Result(dropped={f"license_{decision.reason}": 1})
        license_label = decision.label
    key = request.archive_key
    if key is None:
        prefix = f"raw/{request.kind}/{request.name}/{request.version}"
        key = await asyncio.to_thread(
            deps.store.put_content_addressed, prefix, data, FETCHED_SUFFIX[request.kind]
        )
    package = raw_package(
        request, key, checked.sha256, checked.size, license_label, {**learnt, "fetched": fetched}
    )
    await asyncio.to_thread(record_package, deps.engine, package)
    return Result(outputs=[Output("raw.packages", package.source_id, package)])


def record_package(engine: Engine, package: RawPackage) -> None:
    values = package.model_dump(
        include={
            "source_id",
            "kind",
            "name",
            "version",
            "license",
            "archive_key",
            "sha256",
            "size_bytes",
        }
    )
    with Session(engine) as session, session.begin():
        session.merge(Package(**values, record=package.model_dump_json()))


def attach(ctx: StageContext) -> None:
    deps = IngestDeps(ctx.settings, ctx.store, ctx.engine)

    async def handle(value: bytes, key: str | None) -> Result:
        result = await ingest_request(parse_request(value), deps)
        result.count("packages")
        return result

    attach_stage(ctx, "ingest", "sources.requests", handle)
