"""Parse stage: `raw.packages` → Elixir files, analysed, filtered → dedup → `parsed.files`.

The `parse` agent reads each archive from the store as a stream, one member at a time
(never extracting to disk, never holding the archive whole), runs every `.ex`/`.exs`
file through the per-file steps of `streams.files` (path, encoding, redaction, syntax,
quality and contamination filters) and emits each
kept file keyed by the sha256 of its normalised content to `files.candidates`; the
agents of `streams.dedup` then remove exact and near duplicates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from exforge.core.store import ObjectNotFound, ObjectStore, sha256_hex
from exforge.core.telemetry import REDACTIONS
from schemas.records import ParsedFile, RawPackage
from streams import dedup
from streams.archives import CorruptArchive, Limits, source_members
from streams.dedup import Outcome, record_outcomes
from streams.files import (
    Dropped,
    FileSteps,
    analysed_file,
    claim_check,
    cleaned_book_segment,
    decode_source,
    file_outcome,
)
from streams.sources.books import book_files
from streams.stage import BadMessage, Output, Result, StageContext, attach_stage

__all__ = ["CorruptArchive", "SourceFile", "decode_source", "elixir_members", "parsed_file"]

ELIXIR_SUFFIXES = (".ex", ".exs")


@dataclass(frozen=True)
class SourceFile:
    path: str
    data: bytes


def elixir_members(
    archive: bytes | BinaryIO, limits: Limits | None = None, strip_root: bool = False
) -> Iterator[SourceFile]:
    """The `.ex`/`.exs` files of a source archive (a Hex format-3 tarball's contents, or
    a plain or gzip'd tar), streamed by the safe reader: a hostile member or an archive
    over the limits refuses the whole archive with a precise `ArchiveError`."""
    for member in source_members(archive, limits or Limits.defaults(), strip_root):
        if member.path.endswith(ELIXIR_SUFFIXES):
            yield SourceFile(member.path, member.data)


def parsed_file(
    package: RawPackage, path: str, text: str, store: ObjectStore, claim_check_bytes: int
) -> ParsedFile | None:
    """Analyse one file, unfiltered; None when it does not parse. Large content goes by
    reference."""
    file = analysed_file(package, path, text)
    return None if file is None else claim_check(file, store, claim_check_bytes)


def attach(ctx: StageContext) -> None:
    settings = ctx.settings
    steps = FileSteps.from_settings(settings)

    def outcomes(package: RawPackage) -> Iterator[tuple[str, Dropped | ParsedFile]]:
        """Each file of the package and what became of it; the archive's sha256 is
        checked (reading it as a stream) before any of its bytes are used."""
        if package.kind == "book":
            pdf = ctx.store.get(package.archive_key)
            if sha256_hex(pdf) != package.sha256:
                raise BadMessage(f"archive {package.archive_key} does not match its sha256")
            for segment in book_files(package, pdf):
                yield segment.path, cleaned_book_segment(segment, ctx.store, steps)
            return
        if ctx.store.digest(package.archive_key)[0] != package.sha256:
            raise BadMessage(f"archive {package.archive_key} does not match its sha256")
        limits = Limits.from_settings(settings)
        with ctx.store.reader(package.archive_key) as archive:
            for m in elixir_members(archive, limits, strip_root=package.kind == "github"):
                yield m.path, file_outcome(package, m.path, m.data, ctx.store, steps)

    def handle_package(value: bytes, key: str | None) -> Result:
        package = RawPackage.model_validate_json(value)
        result = Result()
        dropped: list[Outcome] = []
        try:
            files = list(outcomes(package))
        except ObjectNotFound:
            raise BadMessage(f"archive {package.archive_key} is not in the store") from None
        for path, outcome in files:
            result.count("files")
            if isinstance(outcome, Dropped):
                if outcome.failure is not None:
                    result.failures.append(outcome.failure)
                dropped.append(Outcome(package.source_id, path, None, outcome.reason))
                result.drop(outcome.reason)
                continue
            for kind, count in outcome.redactions.items():
                REDACTIONS.labels(kind).inc(count)
            result.outputs.append(Output("files.candidates", outcome.sha256, outcome))
        if dropped:
            record_outcomes(ctx.engine, dropped)
        return result

    attach_stage(ctx, "parse", "raw.packages", handle_package)

    dedup.attach(ctx)
