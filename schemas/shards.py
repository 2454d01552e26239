"""The shard format: object names, the zstd JSONL encoding, the Parquet copy, the
train/validation split, and the curriculum order that the shard stage, the dataset
export and the trainer share.

A shard holds ShareGPT rows (`{"id", "conversations", "meta"}`), one JSON object per
line, zstd-compressed; each (dataset, stage, split) group has a `manifest.json` listing
its shards with their key, sha256, sample and token counts.

Curriculum order (`curriculum`): stage by stage; inside a stage easy → hard by
difficulty, then by curriculum position (where the source fixes one, e.g. a book's
chapter order; unset sorts first), then by sample id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from schemas.records import InstructionSample

VALIDATION_FRACTION = 0.02
ZSTD_LEVEL = 10
FORMAT = "sharegpt-jsonl-zstd"

Row = dict[str, Any]


def split_for(sample_id: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """Stable train/validation assignment from the sample id's hash."""
    bucket = int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"


def shard_prefix(dataset: str, stage: int, split: str) -> str:
    return f"shards/{dataset}/stage{stage}/{split}"


def shard_key(dataset: str, stage: int, split: str, index: int) -> str:
    return f"{shard_prefix(dataset, stage, split)}/{index:05d}.jsonl.zst"


def manifest_key(dataset: str, stage: int, split: str) -> str:
    return f"{shard_prefix(dataset, stage, split)}/manifest.json"


def parquet_key(key: str) -> str:
    return key.removesuffix(".jsonl.zst") + ".parquet"


def sharegpt_line(sample: InstructionSample) -> str:
    """A sample as its shard line (keys sorted, so the same sample gives the same bytes)."""
    return json.dumps(sample.sharegpt(), ensure_ascii=False, sort_keys=True)


def encode_shard(lines: list[str]) -> bytes:
    """Deterministic zstd JSONL: the same samples always give the same bytes."""
    body = "".join(line + "\n" for line in lines).encode()
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)


def decode_shard(data: bytes) -> list[Row]:
    body = zstandard.ZstdDecompressor().decompress(data)
    return [json.loads(line) for line in body.decode().splitlines() if line]


def difficulty(row: Row) -> int:
    """A row's difficulty (1 when its meta does not say)."""
    return row.get("meta", {}).get("difficulty", 1)


def curriculum_key(
    stage: int, level: int, position: int | None, sample_id: str
) -> tuple[int, int, int, str]:
    """Where a sample sorts in the curriculum (see the module doc)."""
    return (stage, level, -1 if position is None else position, sample_id)


def curriculum(rows: Iterable[Row]) -> list[Row]:
    """ShareGPT rows in curriculum order."""

    def key(row: Row) -> tuple[int, int, int, str]:
        meta: Mapping[str, Any] = row["meta"]
        return curriculum_key(meta["stage"], difficulty(row), meta.get("position"), row["id"])

    return sorted(rows, key=key)


PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("kind", pa.string()),
        ("stage", pa.int32()),
        ("difficulty", pa.int32()),
        ("license", pa.string()),
        ("concepts", pa.list_(pa.string())),
        ("meta", pa.string()),
    ]
)


def parquet_bytes(rows: list[Row]) -> bytes:
    """ShareGPT rows as Parquet (`meta` also as JSON text, its main fields as columns)."""
    table = pa.Table.from_pylist(
        [
            {
                "id": row["id"],
                "conversations": row["conversations"],
                "kind": row["meta"]["kind"],
                "stage": row["meta"]["stage"],
                "difficulty": difficulty(row),
                "license": row["meta"].get("license"),
                "concepts": row["meta"].get("concepts", []),
                "meta": json.dumps(row["meta"], sort_keys=True, ensure_ascii=False),
            }
            for row in rows
        ],
        schema=PARQUET_SCHEMA,
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
