"""The topic catalogue: every topic exforge uses, its key, its record and its policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.records import (
    BandMessage,
    DeadLetter,
    InstructionSample,
    ModelVersionEvent,
    NearDupEvent,
    ParsedFile,
    RawPackage,
    Record,
    SourceRequest,
    TrainingEvent,
    TrainingShard,
)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: type[Record]
    partitions: int | None = None  # None: the `topic_partitions` setting
    cleanup_policy: Literal["delete", "compact"] = "delete"
    internal: bool = False  # repartition topics between stages, not for external producers


CATALOGUE: tuple[TopicSpec, ...] = (
    TopicSpec("sources.requests", "source id", SourceRequest),
    TopicSpec("raw.packages", "source id", RawPackage),
    TopicSpec("files.candidates", "sha256 of normalised content", ParsedFile, internal=True),
    TopicSpec(
        "files.bands", "sha256 (to the partition owning the buckets)", BandMessage, internal=True
    ),
    TopicSpec("files.neardup", "sha256 of normalised content", NearDupEvent, internal=True),
    TopicSpec("parsed.files", "sha256 of normalised content", ParsedFile),
    TopicSpec("instruction.samples", "sample id", InstructionSample),
    TopicSpec("training.shards", "dataset/stage", TrainingShard, partitions=1),
    TopicSpec("training.events", "run id", TrainingEvent),
    TopicSpec("models.versions", "model name", ModelVersionEvent, partitions=1),
    TopicSpec("dlq", "original key", DeadLetter),
)

# Stage agent → the topic it consumes (all in the worker's consumer group).
STAGE_INPUTS: dict[str, str] = {
    "ingest": "sources.requests",
    "parse": "raw.packages",
    "dedup": "files.candidates",
    "neardup-bands": "files.bands",
    "neardup": "files.neardup",
    "instruct": "parsed.files",
    "shard": "instruction.samples",
}

BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in CATALOGUE}


def spec(name: str) -> TopicSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(BY_NAME)}") from None


def topic_name(prefix: str, topic: TopicSpec | str) -> str:
    """A catalogue topic's name on the broker: the configured prefix (`topic_prefix`)
    before its catalogue name."""
    return prefix + (topic if isinstance(topic, str) else topic.name)
