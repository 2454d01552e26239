"""Topic records: the contract between stages and with external producers.

Every record carries `schema_version`. Values travel as JSON; large payloads travel by
reference to the object store (claim check) and never inline.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

SourceKind = Literal["dir", "hex", "github", "book"]
Sha256 = str


def utcnow() -> datetime:
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of all topic records: strict about unknown fields, versioned."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        return cls.model_validate_json(data)


class SourceRequest(Record):
    """Ask the ingest stage to collect one source."""

    source_id: str = Field(
        description="e.g. hex:jason@1.4.4, github:owner/repo@sha, book:<sha256>, dir:name@version",
        pattern=r"^(dir|hex|github|book):.+",
    )
    kind: SourceKind
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    license: str | None = Field(None, description="Declared license, free text or SPDX id.")
    archive_key: str | None = Field(
        None, description="Object-store key of an archive already uploaded (dir, book)."
    )
    sha256: Sha256 | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Expected sha256 of the archive."
    )
    url: str | None = Field(None, description="Where to fetch the archive from (hex, github).")
    options: dict[str, str] = Field(default_factory=dict)
    requested_at: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _source_id_matches_kind(self) -> SourceRequest:
        if not self.source_id.startswith(f"{self.kind}:"):
            raise ValueError(f"source_id {self.source_id!r} does not start with {self.kind}:")
        return self


class RawPackage(Record):
    """A fetched, checksum-verified archive, stored content-addressed."""

    source_id: str
    kind: SourceKind
    name: str
    version: str
    license: str | None = None
    archive_key: str
    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    metadata: dict[str, Any] = Field(default_factory=dict)
    fetched_at: datetime = Field(default_factory=utcnow)


class FunctionInfo(BaseModel):
    """One function or macro definition (all clauses of one name/arity)."""

    model_config = ConfigDict(extra="forbid")

    module: str
    name: str
    arity: int = Field(ge=0)
    kind: Literal["def", "defp", "defmacro", "defmacrop"]
    doc: str | None = None
    head: str = Field(description="Source of the first clause's head, e.g. `def get(key)`.")
    source: str = Field(description="Source of every clause of this name/arity.")
    start_line: int = Field(ge=1)
    end_line: int = Field(ge=1)

    @property
    def public(self) -> bool:
        return self.kind in ("def", "defmacro")


class ModuleInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    moduledoc: str | None = None
    start_line: int = Field(ge=1)
    end_line: int = Field(ge=1)


class TypeInfo(BaseModel):
    """A type or a behaviour callback declared in a module."""

    model_config = ConfigDict(extra="forbid")

    module: str
    name: str
    arity: int = Field(ge=0)
    kind: Literal["type", "typep", "opaque", "callback", "macrocallback"]
    line: int = Field(ge=1)


class Doctest(BaseModel):
    """One `iex>` example of a doc: the expression and the result the doc expects."""

    model_config = ConfigDict(extra="forbid")

    owner: str = Field(description="`Module` for a @moduledoc, `Module.name/arity` for a @doc.")
    expression: str
    expected: str | None = Field(None, description="None when the example shows no result.")


class BehaviourUse(BaseModel):
    """A behaviour a module adopts (`use X` or `@behaviour X`) and the callbacks it defines."""

    model_config = ConfigDict(extra="forbid")

    module: str
    behaviour: str
    via: Literal["use", "behaviour", "call"] = Field(
        description="`call`: not adopted, but started or called (`Registry.register`…)."
    )
    otp: bool = Field(description="One of OTP's/Elixir's process behaviours (GenServer…).")
    callbacks: list[str] = Field(default_factory=list, description="Implemented, `name/arity`.")


class SupervisionTree(BaseModel):
    """Children and strategy handed to `Supervisor.init/start_link` or `DynamicSupervisor`."""

    model_config = ConfigDict(extra="forbid")

    module: str
    supervisor: Literal["Supervisor", "DynamicSupervisor"]
    strategy: str | None = None
    children: list[str] = Field(default_factory=list, description="Child module per spec.")


class CodeMetrics(BaseModel):
    """Line-based metrics and a complexity measure of one file."""

    model_config = ConfigDict(extra="forbid")

    lines: int = Field(0, ge=0)
    loc: int = Field(0, ge=0, description="Lines that are neither blank nor only a comment.")
    comment_lines: int = Field(0, ge=0)
    comment_ratio: float = Field(0.0, ge=0, le=1, description="Comment lines / non-blank lines.")
    doc_coverage: float | None = Field(
        None, ge=0, le=1, description="Documented / public functions (None: none public)."
    )
    max_line_length: int = Field(0, ge=0)
    mean_line_length: float = Field(0.0, ge=0)
    alphanumeric_fraction: float = Field(0.0, ge=0, le=1)
    complexity: int = Field(
        1, ge=1, description="1 + branch points (extra clauses, if/unless, guards, and/or…)."
    )
    nesting: int | None = Field(
        None,
        ge=0,
        description="Deepest nesting of do-blocks and anonymous functions (None: not measured).",
    )


class ElixirAnalysis(BaseModel):
    """What a file contains beyond its modules and functions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    types: list[TypeInfo] = Field(default_factory=list)
    doctests: list[Doctest] = Field(default_factory=list)
    behaviours: list[BehaviourUse] = Field(default_factory=list)
    supervisors: list[SupervisionTree] = Field(default_factory=list)
    pipes: int = Field(0, ge=0, description="`|>` operators.")
    longest_pipe: int = Field(0, ge=0, description="`|>` operators in the longest chain.")
    multi_clause_functions: int = Field(0, ge=0)
    case: int = Field(0, ge=0)
    cond: int = Field(0, ge=0)
    with_: int = Field(0, ge=0, alias="with")
    destructuring: int = Field(0, ge=0, description="`=` / `<-` with a composite pattern.")
    spawns: int = Field(0, ge=0)
    sends: int = Field(0, ge=0)
    receives: int = Field(0, ge=0)
    macros: int = Field(0, ge=0, description="`defmacro`/`defmacrop` definitions.")
    quotes: int = Field(0, ge=0)
    unquotes: int = Field(0, ge=0)
    test_modules: list[str] = Field(default_factory=list, description="`use ExUnit.Case`.")
    tests: int = Field(0, ge=0)
    describes: int = Field(0, ge=0)
    doctest_targets: list[str] = Field(default_factory=list, description="`doctest Mod`.")
    metrics: CodeMetrics = Field(default_factory=CodeMetrics)


class Quality(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: float = Field(ge=0, le=1, description="Code metrics combined with source signals.")
    signals: dict[str, float] = Field(
        default_factory=dict, description="Source signals used (stars, downloads…)."
    )


class NearDup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bands: list[str] = Field(
        default_factory=list, description="LSH band keys `band:hash` of the MinHash signature."
    )
    cluster: str | None = Field(
        None, description="sha256 of the first file of its near-duplicate cluster."
    )


class BookSegment(BaseModel):
    """Where a book segment sits and what it teaches (for `book_segment` files)."""

    model_config = ConfigDict(extra="forbid")

    book_title: str
    chapter: int = Field(ge=1)
    chapter_title: str
    section: str | None = None
    page: int = Field(ge=1)
    prose: str = Field("", description="The prose that explains the code (or the section).")
    code: str | None = Field(None, description="The code block, byte-exact.")
    code_language: Literal["elixir", "iex"] | None = None
    concepts: list[str] = Field(default_factory=list, description="Introduced by its chapter.")
    references: list[str] = Field(
        default_factory=list, description="Concepts of earlier chapters it uses."
    )
    depends_on: list[int] = Field(
        default_factory=list, description="Earlier chapters its chapter builds on."
    )
    difficulty: int = Field(1, ge=1, le=5)
    chapter_difficulty: int = Field(1, ge=1, le=5)


class ParsedFile(Record):
    """One kept Elixir file with its analysis; content inline or by reference."""

    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of normalised content")
    source_id: str
    path: str
    license: str | None = None
    kind: Literal["elixir_file", "book_segment"] = "elixir_file"
    content: str | None = Field(None, description="Inline content, when small.")
    content_ref: str | None = Field(None, description="Object-store key, when large.")
    size_bytes: int = Field(ge=0)
    lines: int = Field(ge=0)
    modules: list[ModuleInfo] = Field(default_factory=list)
    functions: list[FunctionInfo] = Field(default_factory=list)
    analysis: ElixirAnalysis = Field(default_factory=ElixirAnalysis)
    quality: Quality | None = None
    redactions: dict[str, int] = Field(
        default_factory=dict, description="Secrets/PII replaced, by kind (email, key, ip)."
    )
    near_dup: NearDup = Field(default_factory=NearDup)
    book: BookSegment | None = Field(None, description="Set for kind book_segment.")

    @model_validator(mode="after")
    def _content_or_ref(self) -> ParsedFile:
        if (self.content is None) == (self.content_ref is None):
            raise ValueError("exactly one of content and content_ref must be set")
        return self


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Literal["system", "human", "gpt"] = Field(alias="from")
    value: str = Field(min_length=1)


class SourceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_id: str
    path: str
    sha256: Sha256
    start_line: int | None = None
    end_line: int | None = None


class SampleMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="Generator that made the sample, e.g. doc_to_code.")
    stage: int = Field(ge=1, le=3, description="Curriculum stage.")
    difficulty: int = Field(1, ge=1, le=5)
    license: str | None = None
    concepts: list[str] = Field(default_factory=list)
    source_refs: list[SourceRef] = Field(default_factory=list)
    position: int | None = Field(
        None, ge=0, description="Order within its stage where the source fixes one (book_qa)."
    )


class InstructionSample(Record):
    """A ShareGPT conversation with its provenance; the id is a hash of the content."""

    sample_id: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
    conversations: list[Turn] = Field(min_length=2)
    meta: SampleMeta
    tokens: int | None = Field(
        None, ge=0, description="Tekken tokens of the conversation as the trainer encodes it."
    )

    @staticmethod
    def content_id(conversations: list[Turn], kind: str) -> str:
        """Content hash: the same conversation of the same kind always has the same id."""
        canonical = json.dumps(
            [kind, [[t.from_, t.value] for t in conversations]], ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sharegpt(self) -> dict[str, Any]:
        """The sample as one ShareGPT JSON object (what shards hold)."""
        return {
            "id": self.sample_id,
            "conversations": [t.model_dump(by_alias=True) for t in self.conversations],
            "meta": self.meta.model_dump(exclude_none=True),
        }


class TrainingShard(Record):
    """A sealed shard of samples in the store."""

    dataset: str
    stage: int = Field(ge=1, le=3)
    split: Literal["train", "validation"]
    index: int = Field(ge=0)
    key: str = Field(description="Object-store key of the .jsonl.zst shard.")
    manifest_key: str
    samples: int = Field(ge=0)
    tokens: int = Field(ge=0, description="Token count (0 until tokenised).")
    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the shard object.")


class TrainingEvent(Record):
    run_id: str
    event: Literal["started", "progress", "stage", "checkpoint", "validation", "finished", "failed"]
    step: int = Field(0, ge=0)
    stage: int | None = Field(None, ge=1, le=3)
    metrics: dict[str, float] = Field(default_factory=dict)
    checkpoint_key: str | None = None
    message: str | None = None
    at: datetime = Field(default_factory=utcnow)


class ModelVersionEvent(Record):
    name: str
    version: int = Field(ge=1)
    action: Literal["registered", "promoted", "rolled_back", "retired", "split"]
    status: Literal["registered", "staging", "production", "retired"]
    base_model: str | None = None
    adapter_key: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)


class DeadLetter(Record):
    """A message a stage could not process, with why and where its bytes are kept."""

    stage: str
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    key: str | None = None
    error_class: str
    error_message: str
    payload_ref: str = Field(description="Object-store key of the original message value.")
    payload_sha256: Sha256
    detail: dict[str, str] = Field(default_factory=dict)
    failed_at: datetime = Field(default_factory=utcnow)

    @property
    def dead_letter_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


class BandMessage(Record):
    """On `files.bands`, keyed by the file's sha256: the file's registration in its LSH
    buckets, one partition after another. Sent to the partition that owns some of
    `bands` (`exforge.elixir.neardup.bucket_partition`), which enters the file in those
    and passes the rest on to the next partition owning some, in partition order; the
    last tells the file `registered`. `earlier` and `later` carry what the partitions
    before told the file (`exforge.elixir.neardup.Bucket.register`): the smallest
    smaller file it shares a bucket with, and the files it displaced as their bucket's
    smallest, so that the file hears one message however many partitions it visits."""

    sha256: Sha256 = Field(pattern=r"^[0-9a-f]{64}$")
    bands: list[str] = Field(min_length=1, description="Bucket keys `band:hash` left.")
    earlier: Sha256 | None = None
    later: list[Sha256] = Field(default_factory=list)


class NearDupEvent(Record):
    """On `files.neardup`, keyed by the sha256 it concerns (`decide`: sent to a partition).

    `registered`: the file's registration (`BandMessage`) went through every partition
    owning its buckets; `other` is the smallest file with a smaller sha256 sharing a
    bucket with it, if any, and `later` the files it displaced as a bucket's smallest,
    whose `answer` it waits for.
    To a file displaced by a smaller newcomer (`other`): `displaced`, which the file
    answers. `answer`: `other` heard it was displaced by this file; `cluster` is its
    cluster if it was already decided (or the one of an earlier batch's file it collides
    with). `decide` asks a partition to decide its held files.
    """

    kind: Literal["registered", "displaced", "answer", "decide"]
    sha256: Sha256 | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    other: Sha256 | None = None
    cluster: Sha256 | None = None
    later: list[Sha256] = Field(default_factory=list)
    partition: int | None = Field(None, ge=0)
