"""Ingest stage: `sources.requests` → verify and store the archive → `raw.packages`."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy.orm import Session

from exforge.db import Package
from exforge.store import ObjectNotFound, sha256_hex
from schemas.records import RawPackage, SourceRequest
from streams.stage import BadMessage, Output, Result, StageContext, attach_stage


class ChecksumMismatch(BadMessage):
    pass


def parse_request(value: bytes) -> SourceRequest:
    try:
        return SourceRequest.model_validate_json(value)
    except ValidationError:
        raise
    except ValueError as exc:
        raise BadMessage(f"not a SourceRequest: {exc}") from exc


def verify_archive(data: bytes, expected_sha256: str | None) -> str:
    """The archive's sha256, checked against the one the request promised."""
    actual = sha256_hex(data)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ChecksumMismatch(
            f"archive sha256 {actual} does not match the expected {expected_sha256}"
        )
    return actual


def raw_package(request: SourceRequest, archive_key: str, sha256: str, size: int) -> RawPackage:
    return RawPackage(
        source_id=request.source_id,
        kind=request.kind,
        name=request.name,
        version=request.version,
        license=request.license,
        archive_key=archive_key,
        sha256=sha256,
        size_bytes=size,
        metadata=dict(request.options),
    )


def attach(ctx: StageContext) -> None:
    def handle(value: bytes, key: str | None) -> Result:
        request = parse_request(value)
        if request.kind != "dir":
            raise BadMessage(f"source kind {request.kind!r} is not supported by this worker")
        if request.archive_key is None:
            raise BadMessage("a dir source request needs archive_key (upload it first)")
        try:
            data = ctx.store.get(request.archive_key)
        except ObjectNotFound:
            raise BadMessage(f"archive {request.archive_key} is not in the store") from None
        sha256 = verify_archive(data, request.sha256)
        package = raw_package(request, request.archive_key, sha256, len(data))
        record_package(ctx, package)
        return Result(outputs=[Output("raw.packages", package.source_id, package)])

    attach_stage(ctx, "ingest", "sources.requests", handle)


def record_package(ctx: StageContext, package: RawPackage) -> None:
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
    with Session(ctx.engine) as session, session.begin():
        session.merge(Package(**values))
