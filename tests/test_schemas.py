"""Topic records and their generated JSON Schemas: the contract with external producers."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from schemas.catalogue import BY_NAME, CATALOGUE, spec
from schemas.jsonschema import JSON_DIR, render
from schemas.records import (
    SCHEMA_VERSION,
    BandMessage,
    DeadLetter,
    FunctionInfo,
    InstructionSample,
    ModelVersionEvent,
    ModuleInfo,
    NearDupEvent,
    ParsedFile,
    RawPackage,
    Record,
    SampleMeta,
    SourceRef,
    SourceRequest,
    TrainingEvent,
    TrainingShard,
    Turn,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def source_request(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "source_id": "dir:kv_cache@0.3.1",
        "kind": "dir",
        "name": "kv_cache",
        "version": "0.3.1",
        "archive_key": f"raw/dir/kv_cache/0.3.1/{SHA_A}.tar",
        "sha256": SHA_A,
    }
    fields.update(changes)
    return fields


def conversation(human: str = "Write add/2.", gpt: str = "def add(a, b), do: a + b") -> list[Turn]:
    return [Turn(from_="human", value=human), Turn(from_="gpt", value=gpt)]


def one_of_each() -> list[Record]:
    """One populated record of every catalogue value model."""
    turns = conversation()
    return [
        SourceRequest(**source_request(license="MIT", options={"path": "/x"}, requested_at=AT)),
        RawPackage(
            source_id="hex:jason@1.4.4",
            kind="hex",
            name="jason",
            version="1.4.4",
            license="Apache-2.0",
            archive_key=f"raw/hex/jason/1.4.4/{SHA_A}.tar",
            sha256=SHA_A,
            size_bytes=1234,
            metadata={"files": 3, "nested": {"a": [1, 2]}},
            fetched_at=AT,
        ),
        ParsedFile(
            sha256=SHA_B,
            source_id="dir:kv_cache@0.3.1",
            path="lib/kv_cache.ex",
            license="MIT",
            content="defmodule KvCache do\nend\n",
            size_bytes=25,
            lines=2,
            modules=[ModuleInfo(name="KvCache", moduledoc="Cache.", start_line=1, end_line=2)],
            functions=[
                FunctionInfo(
                    module="KvCache",
                    name="get",
                    arity=1,
                    kind="def",
                    doc="Get it.",
                    head="def get(key)",
                    source="def get(key), do: key",
                    start_line=1,
                    end_line=1,
                )
            ],
        ),
        InstructionSample(
            sample_id=InstructionSample.content_id(turns, "doc_to_code"),
            conversations=turns,
            meta=SampleMeta(
                kind="doc_to_code",
                stage=2,
                difficulty=3,
                license="MIT",
                concepts=["pattern matching"],
                source_refs=[
                    SourceRef(
                        source_id="dir:kv_cache@0.3.1",
                        path="lib/kv_cache.ex",
                        sha256=SHA_B,
                        start_line=3,
                        end_line=7,
                    )
                ],
            ),
        ),
        TrainingShard(
            dataset="elixir",
            stage=1,
            split="validation",
            index=7,
            key="shards/elixir/stage1/validation/00007.jsonl.zst",
            manifest_key="shards/elixir/stage1/validation/manifest.json",
            samples=512,
            tokens=9000,
            sha256=SHA_A,
        ),
        TrainingEvent(
            run_id="run-1",
            event="checkpoint",
            step=100,
            stage=2,
            metrics={"loss": 0.5},
            checkpoint_key="runs/run-1/checkpoints/100/",
            at=AT,
        ),
        ModelVersionEvent(
            name="devstral-elixir",
            version=3,
            action="promoted",
            status="production",
            base_model="mistralai/Devstral-Small",
            metrics={"pass@1": 0.4},
            at=AT,
        ),
        DeadLetter(
            stage="parse",
            topic="exforge.raw.packages",
            partition=2,
            offset=41,
            key="dir:kv_cache@0.3.1",
            error_class="CorruptArchive",
            error_message="corrupt archive: unexpected end of data",
            payload_ref=f"dlq/{SHA_A}",
            payload_sha256=SHA_A,
            detail={"path": "lib/a.ex"},
            failed_at=AT,
        ),
        BandMessage(sha256=SHA_A, bands=["3:00ff00ff00ff00ff", "7:0123456789abcdef"]),
        BandMessage(sha256=SHA_B, bands=["3:00ff00ff00ff00ff"], earlier=SHA_A, later=[SHA_A]),
        NearDupEvent(kind="registered", sha256=SHA_B, other=SHA_A, later=[SHA_A]),
    ]


# --- JSON Schema files -----------------------------------------------------------------


def test_json_schema_files_match_the_models() -> None:
    rendered = render()
    on_disk = {path.name: path.read_text() for path in JSON_DIR.glob("*.json")}
    fix = "the JSON Schemas drifted from schemas/records.py: run `python -m schemas.jsonschema`"
    assert sorted(on_disk) == sorted(rendered), fix
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name}: {fix}"


def test_render_has_one_schema_per_value_model_with_an_id() -> None:
    rendered = render()
    models = {s.value for s in CATALOGUE}
    assert set(rendered) == {f"{m.__name__}.json" for m in models}
    for model in models:
        schema = json.loads(rendered[f"{model.__name__}.json"])
        assert schema["$id"] == f"https://exforge.dev/schemas/{model.__name__}.json"
        assert schema["title"] == model.__name__
        assert "schema_version" in schema["properties"]
        # extra="forbid" must reach producers in other languages too
        assert schema["additionalProperties"] is False


def test_every_topic_has_a_versioned_value_model() -> None:
    assert len(BY_NAME) == len(CATALOGUE), "duplicate topic name in the catalogue"
    for topic in CATALOGUE:
        assert issubclass(topic.value, Record), topic.name
        field = topic.value.model_fields.get("schema_version")
        assert field is not None, topic.name
        assert field.default == SCHEMA_VERSION
    for name in ("sources.requests", "raw.packages", "parsed.files", "instruction.samples"):
        assert spec(name).name == name
    with pytest.raises(KeyError, match="unknown topic"):
        spec("no.such.topic")


# --- records ---------------------------------------------------------------------------


def test_one_of_each_covers_the_catalogue() -> None:
    assert {type(r) for r in one_of_each()} == {s.value for s in CATALOGUE}


@pytest.mark.parametrize("record", one_of_each(), ids=lambda r: type(r).__name__)
def test_records_round_trip_through_bytes(record: Record) -> None:
    data = record.to_bytes()
    assert isinstance(data, bytes)
    decoded = json.loads(data)
    assert decoded["schema_version"] == SCHEMA_VERSION
    assert None not in decoded.values(), "to_bytes leaves unset optional fields out"
    again = type(record).from_bytes(data)
    assert again == record
    assert again.to_bytes() == data


def test_sample_turns_serialise_with_the_sharegpt_from_key() -> None:
    sample = next(r for r in one_of_each() if isinstance(r, InstructionSample))
    decoded = json.loads(sample.to_bytes())
    assert [t["from"] for t in decoded["conversations"]] == ["human", "gpt"]
    assert "from_" not in decoded["conversations"][0]
    gpt = sample.conversations[1].value
    assert sample.sharegpt()["conversations"][1] == {"from": "gpt", "value": gpt}


def test_source_request_accepts_a_valid_request() -> None:
    request = SourceRequest.model_validate(source_request())
    assert request.kind == "dir"
    assert request.schema_version == SCHEMA_VERSION
    assert request.requested_at.tzinfo is not None


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"source_id": "hex:kv_cache@0.3.1"}, "does not start with dir:"),
        ({"kind": "book"}, "does not start with book:"),
        ({"source_id": "ftp:kv_cache@0.3.1"}, "source_id"),
        ({"sha256": "A" * 64}, "sha256"),
        ({"sha256": "a" * 63}, "sha256"),
        ({"sha256": "g" * 64}, "sha256"),
        ({"colour": "blue"}, "colour"),
        ({"schema_version": SCHEMA_VERSION + 1}, "schema_version"),
        ({"schema_version": 0}, "schema_version"),
        ({"kind": "svn", "source_id": "svn:x@1"}, "kind"),
        ({"name": ""}, "name"),
    ],
)
def test_source_request_rejects(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        SourceRequest.model_validate(source_request(**changes))


def test_source_request_rejects_unknown_fields_in_json_too() -> None:
    data = json.dumps(source_request(extra_field=1)).encode()
    with pytest.raises(ValidationError, match="extra_field"):
        SourceRequest.from_bytes(data)


def parsed_file_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "sha256": SHA_A,
        "source_id": "dir:x@1",
        "path": "lib/x.ex",
        "size_bytes": 10,
        "lines": 1,
    }
    fields.update(changes)
    return fields


def test_parsed_file_takes_exactly_one_of_content_and_ref() -> None:
    inline = ParsedFile(**parsed_file_fields(content="x"))
    assert inline.content == "x" and inline.content_ref is None
    by_ref = ParsedFile(**parsed_file_fields(content_ref=f"blobs/{SHA_A}"))
    assert by_ref.content is None and by_ref.content_ref == f"blobs/{SHA_A}"
    with pytest.raises(ValidationError, match="exactly one of content and content_ref"):
        ParsedFile(**parsed_file_fields())
    with pytest.raises(ValidationError, match="exactly one of content and content_ref"):
        ParsedFile(**parsed_file_fields(content="x", content_ref=f"blobs/{SHA_A}"))


def test_empty_inline_content_still_counts_as_content() -> None:
    assert ParsedFile(**parsed_file_fields(content="", size_bytes=0, lines=0)).content == ""


def test_content_id_is_stable_and_depends_on_content_and_kind() -> None:
    base = InstructionSample.content_id(conversation(), "doc_to_code")
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert InstructionSample.content_id(conversation(), "doc_to_code") == base
    assert InstructionSample.content_id(conversation(), "explain") != base
    assert (
        InstructionSample.content_id(conversation(gpt="def add(a, b), do: b + a"), "doc_to_code")
        != base
    )
    assert InstructionSample.content_id(conversation(human="Write add/2!"), "doc_to_code") != base
    swapped = [
        Turn(from_="gpt", value="Write add/2."),
        Turn(from_="human", value=conversation()[1].value),
    ]
    assert InstructionSample.content_id(swapped, "doc_to_code") != base
    # the boundary between turns is part of the hash, not just the concatenation
    split_a = conversation(human="ab", gpt="c")
    split_b = conversation(human="a", gpt="bc")
    assert InstructionSample.content_id(split_a, "k") != InstructionSample.content_id(split_b, "k")


def test_instruction_sample_needs_two_turns_and_nonempty_values() -> None:
    with pytest.raises(ValidationError):
        InstructionSample(
            sample_id=SHA_A,
            conversations=[Turn(from_="human", value="hi")],
            meta=SampleMeta(kind="k", stage=1),
        )
    with pytest.raises(ValidationError):
        Turn(from_="human", value="")
    with pytest.raises(ValidationError):
        SampleMeta(kind="k", stage=4)


# --- an external producer --------------------------------------------------------------


def validator_for(model: type[Record]) -> jsonschema.protocols.Validator:
    schema = json.loads((JSON_DIR / f"{model.__name__}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


HAND_WRITTEN: dict[type[Record], dict[str, Any]] = {
    SourceRequest: {
        "schema_version": 1,
        "source_id": "hex:jason@1.4.4",
        "kind": "hex",
        "name": "jason",
        "version": "1.4.4",
        "url": "https://repo.hex.pm/tarballs/jason-1.4.4.tar",
        "sha256": "0" * 64,
        "options": {"priority": "high"},
        "requested_at": "2025-06-01T12:00:00Z",
    },
    InstructionSample: {
        "schema_version": 1,
        "sample_id": "f" * 64,
        "conversations": [
            {"from": "system", "value": "You write Elixir."},
            {"from": "human", "value": "Reverse a list."},
            {"from": "gpt", "value": "Enum.reverse(list)"},
        ],
        "meta": {
            "kind": "handwritten",
            "stage": 1,
            "source_refs": [{"source_id": "book:" + "1" * 64, "path": "ch1", "sha256": "1" * 64}],
        },
    },
    DeadLetter: {
        "stage": "ingest",
        "topic": "exforge.sources.requests",
        "partition": 0,
        "offset": 3,
        "error_class": "ChecksumMismatch",
        "error_message": "bad",
        "payload_ref": "dlq/x",
        "payload_sha256": "2" * 64,
    },
}


@pytest.mark.parametrize("model", list(HAND_WRITTEN), ids=lambda m: m.__name__)
def test_hand_written_json_validates_against_schema_and_model(model: type[Record]) -> None:
    document = HAND_WRITTEN[model]
    validator_for(model).validate(document)
    record = model.from_bytes(json.dumps(document).encode())
    assert record.schema_version == 1
    assert json.loads(record.to_bytes())["schema_version"] == 1


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda d: d.update(kind="svn"), "enum kind"),
        (lambda d: d.update(sha256="xyz"), "sha256 pattern"),
        (lambda d: d.update(surprise=True), "unknown field"),
        (lambda d: d.pop("name"), "missing name"),
        (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "future version"),
    ],
)
def test_schema_and_model_both_reject_bad_external_json(mutate: Any, what: str) -> None:
    document = json.loads(json.dumps(HAND_WRITTEN[SourceRequest]))
    mutate(document)
    errors = list(validator_for(SourceRequest).iter_errors(document))
    assert errors, f"JSON Schema accepted {what}"
    with pytest.raises(ValidationError):
        SourceRequest.from_bytes(json.dumps(document).encode())
