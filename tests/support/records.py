"""Records the tests build by hand."""

from __future__ import annotations

from typing import Any

from schemas.records import InstructionSample, RawPackage, SampleMeta, Turn
from schemas.shards import split_for


def raw_package(source_id: str, **fields: Any) -> RawPackage:
    """A `RawPackage` for calling a stage's steps directly (no archive behind it): kind,
    name and version from `source_id` (`kind:name@version`), any field overridable."""
    kind, _, rest = source_id.partition(":")
    name, _, version = rest.rpartition("@")
    values: dict[str, Any] = {
        "kind": kind,
        "name": name or rest,
        "version": version or "1",
        "archive_key": "unused",
        "sha256": "0" * 64,
        "size_bytes": 0,
        **fields,
    }
    return RawPackage(source_id=source_id, **values)


def make_sample(
    i: int, stage: int = 1, kind: str = "test", difficulty: int = 1
) -> InstructionSample:
    """The `i`-th of a family of distinct one-exchange samples (ids from their content)."""
    turns = [Turn(from_="human", value=f"question {i}"), Turn(from_="gpt", value=f"answer {i}")]
    return InstructionSample(
        sample_id=InstructionSample.content_id(turns, kind),
        conversations=turns,
        meta=SampleMeta(kind=kind, stage=stage, difficulty=difficulty),
    )


def train_samples(count: int, difficulties: int = 1) -> list[InstructionSample]:
    """`count` samples that all fall in the train split of stage 1; the n-th has difficulty
    1 + n % `difficulties`."""
    chosen: list[InstructionSample] = []
    i = 0
    while len(chosen) < count:
        sample = make_sample(i, difficulty=1 + len(chosen) % difficulties)
        if split_for(sample.sample_id) == "train":
            chosen.append(sample)
        i += 1
    return chosen
