"""The parse stage's per-file steps: clean, analyse, filter, claim-check.

An archive member becomes a `Candidate`, whose views (decoded text; the source as the
stage keeps it: normalised, redacted and parsed; its analysis; its record) are each
computed once, when a filter or the record first needs them. The filters are one
ordered list of `(reason, check)` pairs, `FILTERS`: the first check that holds drops
the file with its reason (the label counted in the ledger, in `exforge dataset stats`
and in `exforge_dropped_total`); adding a filter is adding a line. In order:

1. `vendored`: dependency and build paths (`deps/`, `_build/`, `priv/static/`…);
2. `not_utf8`: the bytes do not decode (also a dead letter naming the path);
3. `syntax_error`: tree-sitter finds an error in the cleaned text (normalised, then
   redacted inside literals and comments only, so the code is what the author wrote);
4. `too_deep`: its syntax tree nests deeper than `max_depth` levels (hostile or
   generated input: the analysis recurses per level, and the names of nested modules
   grow with the depth: 100,000 nested `defmodule`s, 2.4 MB, would name 30 GB);
5. `auto_generated`: a generator header or protobuf/gRPC output;
6. the metric filters: `max_line_length`, `mean_line_length`, `alphanumeric_fraction`,
   `too_short`, `too_long`; then `encoded_data`;
7. `contamination`: the file holds an evaluation benchmark's prompt or tests.

`file_outcome` is the whole chain for one member; `exforge inspect` runs the same
`Candidate` and `first_drop`, without the broker.

Book segments (`kind="book_segment"`, from `streams.sources.books`) are prose and code
already cut out of a PDF; `cleaned_book_segment` gives them the steps that apply:
redaction (prose as text, code inside its literals and comments), `contamination`,
near-duplicate bands and the claim check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tree_sitter import Node

from exforge.core.settings import Settings
from exforge.core.store import ObjectStore, sha256_hex
from exforge.elixir.analysis import FileAnalysis, analyse, normalise
from exforge.elixir.decontam import BenchmarkIndex, load_index
from exforge.elixir.neardup import THRESHOLD, text_band_keys
from exforge.elixir.quality import Thresholds, has_blob, is_generated, is_vendored, quality
from exforge.elixir.redact import ElixirLiterals, Redaction, redact, redact_elixir
from exforge.elixir.tree import deeper_than, parse
from schemas.records import CodeMetrics, NearDup, ParsedFile, RawPackage
from streams.stage import Failure

__all__ = [
    "FILTERS",
    "Candidate",
    "Dropped",
    "FileSteps",
    "Source",
    "analysed_file",
    "claim_check",
    "clean_source",
    "cleaned_book_segment",
    "decode_source",
    "file_outcome",
    "first_drop",
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


@dataclass(frozen=True)
class Source:
    """A file's text as the stage keeps it (normalised, redacted), with its bytes, its
    syntax tree and what redaction replaced."""

    text: str
    data: bytes
    root: Node
    redaction: Redaction

    @property
    def literals(self) -> ElixirLiterals:
        return ElixirLiterals(self.text, self.data, self.root)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def clean_source(text: str) -> Source:
    """Normalise, parse, and redact inside literals and comments; the redacted text is
    parsed again only when something was replaced."""
    normal = normalise(text)
    data = _encode(normal)
    root = parse(data)
    redaction = redact_elixir(normal, data, root)
    if redaction.counts:
        data = _encode(redaction.text)
        root = parse(data)
    return Source(redaction.text, data, root, redaction)


def _content_fields(content: str) -> dict[str, Any]:
    """A record's inline `content` with the `sha256` and `size_bytes` that name it."""
    encoded = content.encode()
    return {"sha256": sha256_hex(encoded), "content": content, "size_bytes": len(encoded)}


def file_record(
    package: RawPackage, path: str, source: Source, analysis: FileAnalysis, bands: list[str]
) -> ParsedFile:
    """The record of an analysed file (content inline), with its near-duplicate bands."""
    metadata: dict[str, Any] = package.metadata
    return ParsedFile(
        **_content_fields(source.text),
        source_id=package.source_id,
        path=path,
        license=package.license,
        lines=analysis.lines,
        modules=analysis.modules,
        functions=analysis.functions,
        analysis=analysis.details,
        quality=quality(analysis.details.metrics, metadata),
        redactions=dict(source.redaction.counts),
        near_dup=NearDup(bands=bands),
    )


class Candidate:
    """One archive member on its way through the filters."""

    def __init__(self, package: RawPackage, path: str, data: bytes, steps: FileSteps) -> None:
        self.package = package
        self.path = path
        self.data = data
        self.steps = steps
        self.failure: Failure | None = None  # why the bytes do not decode

    @cached_property
    def text(self) -> str | None:
        """The decoded text; None (and `failure`) when it is not UTF-8."""
        try:
            return decode_source(self.data)
        except UnicodeDecodeError as exc:
            self.failure = Failure.from_exception(exc, path=self.path)
            return None

    @cached_property
    def source(self) -> Source:
        assert self.text is not None, "the not_utf8 filter runs first"
        return clean_source(self.text)

    @cached_property
    def analysis(self) -> FileAnalysis:
        source = self.source
        return analyse(source.text, source.data, source.root)

    @property
    def metrics(self) -> CodeMetrics:
        return self.analysis.details.metrics

    @property
    def thresholds(self) -> Thresholds:
        return self.steps.thresholds

    @cached_property
    def record(self) -> ParsedFile:
        bands = text_band_keys(self.source.text, self.steps.neardup_threshold)
        return file_record(self.package, self.path, self.source, self.analysis, bands)


Check = Callable[[Candidate], bool]

# The parse stage's filters, in order: (drop reason, check that drops).
FILTERS: tuple[tuple[str, Check], ...] = (
    ("vendored", lambda c: is_vendored(c.path)),
    ("not_utf8", lambda c: c.text is None),
    ("syntax_error", lambda c: c.source.root.has_error),
    ("too_deep", lambda c: deeper_than(c.source.root, c.thresholds.max_depth)),
    ("auto_generated", lambda c: is_generated(c.path, c.source.text, c.source.literals)),
    ("max_line_length", lambda c: c.metrics.max_line_length > c.thresholds.max_line_length),
    ("mean_line_length", lambda c: c.metrics.mean_line_length > c.thresholds.max_mean_line_length),
    (
        "alphanumeric_fraction",
        lambda c: c.metrics.alphanumeric_fraction < c.thresholds.min_alphanumeric_fraction,
    ),
    ("too_short", lambda c: c.metrics.loc < c.thresholds.min_loc),
    ("too_long", lambda c: c.metrics.loc > c.thresholds.max_loc),
    ("encoded_data", lambda c: has_blob(c.source.text, c.metrics, c.thresholds)),
    (
        "contamination",
        lambda c: (
            c.steps.benchmarks is not None
            and c.steps.benchmarks.check_text(c.source.text) is not None
        ),
    ),
)


def first_drop(candidate: Candidate) -> str | None:
    """The reason of the first filter that drops the candidate; None when it is kept."""
    return next((reason for reason, check in FILTERS if check(candidate)), None)


def analysed_file(
    package: RawPackage, path: str, text: str, neardup_threshold: float = THRESHOLD
) -> ParsedFile | None:
    """Clean and analyse one file, unfiltered (content inline); None when it does not
    parse."""
    steps = FileSteps(neardup_threshold=neardup_threshold)
    candidate = Candidate(package, path, _encode(text), steps)
    return None if candidate.analysis.has_errors else candidate.record


def claim_check(file: ParsedFile, store: ObjectStore, limit: int) -> ParsedFile:
    """Content over `limit` bytes goes to the store; the record keeps its key."""
    if file.content is None or file.size_bytes <= limit:
        return file
    key = store.put_content_addressed("blobs", file.content.encode())
    return file.model_copy(update={"content": None, "content_ref": key})


def file_outcome(
    package: RawPackage, path: str, data: bytes, store: ObjectStore, steps: FileSteps
) -> ParsedFile | Dropped:
    """Every per-file step for one archive member."""
    candidate = Candidate(package, path, data, steps)
    reason = first_drop(candidate)
    if reason is not None:
        return Dropped(reason, candidate.failure)
    return claim_check(candidate.record, store, steps.claim_check_bytes)


def _redact_code(code: str) -> Redaction:
    data = _encode(code)
    return redact_elixir(code, data, parse(data))


def _redact_segment(content: str, code: str | None) -> Redaction:
    """A segment's markdown: prose as text, its fenced code (at the end) as code."""
    at = content.rfind(f"\n{code}\n```") + 1 if code else 0
    if not code or at == 0:
        return redact(content)
    prose, fenced = redact(content[:at]), _redact_code(code)
    result = Redaction(prose.text + fenced.text + content[at + len(code) :])
    result.counts = prose.counts + fenced.counts
    return result


def cleaned_book_segment(
    segment: ParsedFile, store: ObjectStore, steps: FileSteps
) -> ParsedFile | Dropped:
    """A book segment (content inline), redacted, checked for contamination and banded."""
    assert segment.book is not None and segment.content is not None
    book = segment.book
    redaction = _redact_segment(segment.content, book.code)
    content = redaction.text
    if steps.benchmarks is not None and steps.benchmarks.check_text(content):
        return Dropped("contamination")
    code = _redact_code(book.code).text if book.code is not None else None
    cleaned = segment.model_copy(
        update={
            **_content_fields(content),
            "redactions": dict(redaction.counts),
            "book": book.model_copy(update={"prose": redact(book.prose).text, "code": code}),
            "near_dup": NearDup(bands=text_band_keys(content, steps.neardup_threshold)),
        }
    )
    return claim_check(cleaned, store, steps.claim_check_bytes)
