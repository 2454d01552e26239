"""Parse stage: `raw.packages` → Elixir files, analysed → exact dedup → `parsed.files`.

Two agents: `parse` reads each archive from the store in memory (never extracting to
disk), analyses every `.ex`/`.exs` file and emits a candidate keyed by the sha256 of its
normalised content to `files.candidates`; `dedup` owns those keys by partition and keeps
the first source position seen for each sha256 in a Faust table, so a file identical to
one seen before (in any package) is dropped whatever worker saw the first.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.orm import Session

from exforge.db import FileOutcome
from exforge.store import ObjectNotFound, ObjectStore, sha256_hex
from schemas.records import ParsedFile, RawPackage
from streams.elixir import analyse, normalise
from streams.stage import BadMessage, Failure, Output, Result, StageContext, attach_stage

ELIXIR_SUFFIXES = (".ex", ".exs")
MAX_MEMBER_BYTES = 16 * 1024 * 1024


class CorruptArchive(BadMessage):
    pass


@dataclass(frozen=True)
class SourceFile:
    path: str
    data: bytes


def elixir_members(archive: bytes) -> Iterator[SourceFile]:
    """The `.ex`/`.exs` regular files of a tar archive, read in memory, in archive order."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            for member in tar:
                if not member.isreg() or not member.name.endswith(ELIXIR_SUFFIXES):
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    yield SourceFile(member.name.removeprefix("./"), handle.read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptArchive(f"corrupt archive: {exc}") from exc


def decode_source(data: bytes) -> str:
    """UTF-8 text of a source file; a clear error otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnicodeDecodeError(
            exc.encoding, exc.object, exc.start, exc.end, f"not UTF-8 at byte {exc.start}"
        ) from None


def parsed_file(
    package: RawPackage, path: str, text: str, store: ObjectStore, claim_check_bytes: int
) -> ParsedFile | None:
    """Analyse one file; None when it does not parse. Large content goes by reference."""
    content = normalise(text)
    analysis = analyse(content)
    if analysis.has_errors:
        return None
    encoded = content.encode()
    sha256 = sha256_hex(encoded)
    inline = len(encoded) <= claim_check_bytes
    return ParsedFile(
        sha256=sha256,
        source_id=package.source_id,
        path=path,
        license=package.license,
        content=content if inline else None,
        content_ref=None if inline else store.put_content_addressed("blobs", encoded),
        size_bytes=len(encoded),
        lines=analysis.lines,
        modules=analysis.modules,
        functions=analysis.functions,
    )


def read_content(file: ParsedFile, store: ObjectStore) -> str:
    """A parsed file's content, inline or fetched from the store."""
    if file.content is not None:
        return file.content
    assert file.content_ref is not None
    return store.get(file.content_ref).decode()


def record_outcome(
    ctx: StageContext, source_id: str, path: str, sha256: str | None, reason: str | None
) -> None:
    """Write what became of a file; keyed by position, so replays overwrite."""
    with Session(ctx.engine) as session, session.begin():
        session.merge(
            FileOutcome(
                source_id=source_id, path=path, sha256=sha256, kept=reason is None, reason=reason
            )
        )


def position(file: ParsedFile) -> str:
    return f"{file.source_id}:{file.path}"


def attach(ctx: StageContext) -> None:
    settings = ctx.settings

    def handle_package(value: bytes, key: str | None) -> Result:
        package = RawPackage.model_validate_json(value)
        try:
            archive = ctx.store.get(package.archive_key)
        except ObjectNotFound:
            raise BadMessage(f"archive {package.archive_key} is not in the store") from None
        if sha256_hex(archive) != package.sha256:
            raise BadMessage(f"archive {package.archive_key} does not match its sha256")
        result = Result()
        for member in elixir_members(archive):
            try:
                text = decode_source(member.data)
            except UnicodeDecodeError as exc:
                result.failures.append(Failure.from_exception(exc, path=member.path))
                record_outcome(ctx, package.source_id, member.path, None, "not_utf8")
                result.drop("not_utf8")
                continue
            file = parsed_file(package, member.path, text, ctx.store, settings.claim_check_bytes)
            if file is None:
                record_outcome(ctx, package.source_id, member.path, None, "syntax_error")
                result.drop("syntax_error")
                continue
            result.outputs.append(Output("files.candidates", file.sha256, file))
        return result

    attach_stage(ctx, "parse", "raw.packages", handle_package)

    first_seen = ctx.app.Table(
        "first-seen",
        default=str,
        partitions=settings.topic_partitions,
        key_type=str,
        value_type=str,
    )

    async def handle_candidate(value: bytes, key: str | None) -> Result:
        # Runs on the event loop: the table belongs to this event's partition.
        file = ParsedFile.model_validate_json(value)
        seen = first_seen[file.sha256]
        reason = "exact_duplicate" if seen and seen != position(file) else None
        if not seen:
            first_seen[file.sha256] = position(file)
        await asyncio.to_thread(record_outcome, ctx, file.source_id, file.path, file.sha256, reason)
        if reason:
            return Result(dropped={reason: 1})
        return Result(outputs=[Output("parsed.files", file.sha256, file)])

    attach_stage(ctx, "dedup", "files.candidates", handle_candidate)
