"""The parse stage's per-file steps: analyse, filter, redact, claim-check.

Each step is a plain function; `file_outcome` chains them for one archive member and
returns the `ParsedFile` to pass on or the `Dropped` reason (the label counted in the
ledger, in `exforge dataset stats` and in `exforge_dropped_total`). In order:

1. `vendored`: dependency and build paths (`deps/`, `_build/`, `priv/static/`…);
2. `not_utf8`: the bytes do not decode (also a dead letter naming the path);
3. normalise, then redact secrets and PII, so nothing after sees them;
4. `syntax_error`: tree-sitter finds an error in the redacted text;
5. `auto_generated`, then the metric filters (`max_line_length`, `mean_line_length`,
   `alphanumeric_fraction`, `too_short`, `too_long`), then `encoded_data`;
6. `contamination`: the file holds an evaluation benchmark's prompt or tests.

Book segments (`kind="book_segment"`, from `streams.sources.books`) are prose and code
already cut out of a PDF; `cleaned_book_segment` gives them the steps that apply:
redaction (of the markdown and of the prose and code the generators read),
`contamination`, near-duplicate bands and the claim check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from exforge.elixir.analysis import FileAnalysis, analyse, normalise
from exforge.elixir.decontam import BenchmarkIndex, load_index
from exforge.elixir.neardup import THRESHOLD, text_band_keys
from exforge.elixir.quality import (
    Thresholds,
    blob_reason,
    generated_reason,
    metrics_reason,
    path_reason,
    quality,
)
from exforge.elixir.redact import Redaction, redact
from schemas.records import NearDup, ParsedFile, RawPackage
from streams.stage import Failure

__all__ = [
    "Dropped",
    "FileSteps",
    "analysed_file",
    "claim_check",
    "cleaned_book_segment",
    "decode_source",
    "drop_reason",
    "file_outcome",
    "file_record",
]


@dataclass(frozen=True)
class FileSteps:
    """The knobs of the per-file steps, read once from settings."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    benchmarks: BenchmarkIndex | None = None
    neardup_threshold: float = THRESHOLD
    claim_check_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> FileSteps:
        files = settings.resolved_decontamination_files
        return cls(
            thresholds=Thresholds.from_settings(settings),
            benchmarks=load_index(
                files, settings.decontamination_ngram, settings.decontamination_threshold
            )
            if files
            else None,
            neardup_threshold=settings.neardup_threshold,
            claim_check_bytes=settings.claim_check_bytes,
        )


@dataclass(frozen=True)
class Dropped:
    reason: str
    failure: Failure | None = None


def decode_source(data: bytes) -> str:
    """UTF-8 text of a source file; a clear error otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnicodeDecodeError(
            exc.encoding, exc.object, exc.start, exc.end, f"not UTF-8 at byte {exc.start}"
        ) from None


def analysed_file(
    package: RawPackage, path: str, text: str, neardup_threshold: float = THRESHOLD
) -> ParsedFile | None:
    """Normalise, redact and analyse one file (content inline); None when it does not parse."""
    redaction = redact(normalise(text))
    analysis = analyse(redaction.text)
    if analysis.has_errors:
        return None
    bands = text_band_keys(redaction.text, neardup_threshold)
    return file_record(package, path, redaction, analysis, bands)


def _content_fields(content: str) -> dict[str, Any]:
    """A record's inline `content` with the `sha256` and `size_bytes` that name it."""
    encoded = content.encode()
    return {"sha256": sha256_hex(encoded), "content": content, "size_bytes": len(encoded)}


def file_record(
    package: RawPackage, path: str, redaction: Redaction, analysis: FileAnalysis, bands: list[str]
) -> ParsedFile:
    """The record of an analysed file (content inline), with its near-duplicate bands."""
    metadata: dict[str, Any] = package.metadata
    return ParsedFile(
        **_content_fields(redaction.text),
        source_id=package.source_id,
        path=path,
        license=package.license,
        lines=analysis.lines,
        modules=analysis.modules,
        functions=analysis.functions,
        analysis=analysis.details,
        quality=quality(analysis.details.metrics, metadata),
        redactions=dict(redaction.counts),
        near_dup=NearDup(bands=bands),
    )


def drop_reason(file: ParsedFile, steps: FileSteps) -> str | None:
    """Why an analysed file (content inline) is not kept; None when it is."""
    text = file.content or ""
    thresholds = steps.thresholds
    reason = (
        generated_reason(text)
        or metrics_reason(file.analysis.metrics, thresholds)
        or blob_reason(text, file.analysis.metrics, thresholds)
    )
    if reason is None and steps.benchmarks is not None and steps.benchmarks.check_text(text):
        reason = "contamination"
    return reason


def claim_check(file: ParsedFile, store: ObjectStore, limit: int) -> ParsedFile:
    """Content over `limit` bytes goes to the store; the record keeps its key."""
    if file.content is None or file.size_bytes <= limit:
        return file
    key = store.put_content_addressed("blobs", file.content.encode())
    return file.model_copy(update={"content": None, "content_ref": key})


def cleaned_book_segment(
    segment: ParsedFile, store: ObjectStore, steps: FileSteps
) -> ParsedFile | Dropped:
    """A book segment (content inline), redacted, checked for contamination and banded."""
    assert segment.book is not None and segment.content is not None
    redaction = redact(segment.content)
    content = redaction.text
    if steps.benchmarks is not None and steps.benchmarks.check_text(content):
        return Dropped("contamination")
    book = segment.book
    code = redact(book.code).text if book.code is not None else None
    cleaned = segment.model_copy(
        update={
            **_content_fields(content),
            "redactions": dict(redaction.counts),
            "book": book.model_copy(update={"prose": redact(book.prose).text, "code": code}),
            "near_dup": NearDup(bands=text_band_keys(content, steps.neardup_threshold)),
        }
    )
    return claim_check(cleaned, store, steps.claim_check_bytes)


def file_outcome(
    package: RawPackage, path: str, data: bytes, store: ObjectStore, steps: FileSteps
) -> ParsedFile | Dropped:
    """Every per-file step for one archive member."""
    reason = path_reason(path)
    if reason is not None:
        return Dropped(reason)
    try:
        text = decode_source(data)
    except UnicodeDecodeError as exc:
        return Dropped("not_utf8", Failure.from_exception(exc, path=path))
    file = analysed_file(package, path, text, steps.neardup_threshold)
    if file is None:
        return Dropped("syntax_error")
    reason = drop_reason(file, steps)
    if reason is not None:
        return Dropped(reason)
    return claim_check(file, store, steps.claim_check_bytes)
