"""Training data from the store: shards by manifest, disjoint per rank, in a replayable order.

The order of a stage's samples is a pure function of (seed, stage, epoch, rank), so a
data cursor (epoch, position) is enough to resume exactly where a run stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from exforge.core.store import ObjectNotFound, ObjectStore, sha256_hex
from schemas.shards import (
    FORMAT,
    curriculum,
    decode_shard,
    difficulty,
    encode_shard,
    manifest_key,
    shard_key,
)


@dataclass(frozen=True)
class Cursor:
    """Where a stage's data stream stands: epoch, next pack, unlocked difficulty."""

    stage: int
    epoch: int = 0
    position: int = 0
    level: int = 1

    def as_dict(self) -> dict[str, int]:
        return {
            "stage": self.stage,
            "epoch": self.epoch,
            "position": self.position,
            "level": self.level,
        }


def read_manifest(store: ObjectStore, dataset: str, stage: int, split: str) -> dict[str, Any]:
    try:
        return json.loads(store.get(manifest_key(dataset, stage, split)))
    except ObjectNotFound:
        return {"dataset": dataset, "stage": stage, "split": split, "shards": []}


def stages_with_data(store: ObjectStore, dataset: str) -> list[int]:
    """The curriculum stages whose training split the store holds."""
    return [stage for stage in (1, 2, 3) if store.exists(manifest_key(dataset, stage, "train"))]


def rank_slice(entries: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    """Shards of this rank: every world-th one, so ranks never read the same shard."""
    return [entry for i, entry in enumerate(entries) if i % world == rank]


def load_split(
    store: ObjectStore, dataset: str, stage: int, split: str, rank: int = 0, world: int = 1
) -> list[dict[str, Any]]:
    """This rank's samples of one split, checked against the manifest's checksums.

    With fewer shards than ranks every rank reads all shards and keeps every world-th
    sample instead, so each rank still gets a disjoint, non-empty part.
    """
    entries = read_manifest(store, dataset, stage, split)["shards"]
    by_shard = len(entries) >= world
    samples: list[dict[str, Any]] = []
    for entry in rank_slice(entries, rank, world) if by_shard else entries:
        data = store.get(entry["key"])
        if sha256_hex(data) != entry["sha256"]:
            raise ValueError(f"shard {entry['key']} does not match its manifest checksum")
        samples.extend(decode_shard(data))
    return samples if by_shard else samples[rank::world]


def epoch_order(
    samples: list[dict[str, Any]], seed: int, cursor: Cursor, rank: int
) -> list[dict[str, Any]]:
    """The unlocked samples (difficulty ≤ level) of this epoch, in their seeded order: taken
    in curriculum order first, so the order depends on the samples, not on their shards."""
    pool = [s for s in curriculum(samples) if difficulty(s) <= cursor.level]
    random.Random(f"{seed}/{cursor.stage}/{cursor.epoch}/{cursor.level}/{rank}").shuffle(pool)
    return pool


def mix(
    real: list[dict[str, Any]], rehearsal: list[dict[str, Any]], ratio: float, seed: int
) -> list[dict[str, Any]]:
    """Real samples plus up to `ratio`·len(real) rehearsal samples (SSR buffer)."""
    budget = min(len(rehearsal), round(ratio * len(real)))
    chosen = random.Random(seed).sample(rehearsal, budget) if budget else []
    return real + chosen


def write_split(
    store: ObjectStore,
    dataset: str,
    stage: int,
    split: str,
    samples: list[dict[str, Any]],
    shard_samples: int,
) -> dict[str, Any]:
    """Write samples as shards + manifest in the shard stage's format (SSR buffers use it;
    so do tests and benchmarks that need a corpus without running the pipeline)."""
    entries = []
    for index, start in enumerate(range(0, len(samples), shard_samples)):
        chunk = samples[start : start + shard_samples]
        data = encode_shard([json.dumps(s, ensure_ascii=False, sort_keys=True) for s in chunk])
        key = shard_key(dataset, stage, split, index)
        store.put(key, data)
        entries.append(
            {
                "index": index,
                "key": key,
                "samples": len(chunk),
                "tokens": 0,
                "sha256": sha256_hex(data),
            }
        )
    manifest = {
        "dataset": dataset,
        "stage": stage,
        "split": split,
        "format": FORMAT,
        "samples": len(samples),
        "tokens": 0,
        "shards": entries,
    }
    store.put(manifest_key(dataset, stage, split), json.dumps(manifest).encode())
    return manifest


_TASKS = {
    1: ("Explain what `{name}` returns.", "`{name}` returns `{{:ok, value}}` for {noun}."),
    2: ("Write `{name}` in Elixir.", "def {name}(x), do: Enum.map(x, &(&1 * {k}))"),
    3: ("Fix the bug in `{name}`.", "defmodule {mod} do\n  def {name}(x) when x > {k}, do: x\nend"),
}


def synthetic_samples(stage: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Small, learnable ShareGPT samples whose style differs per stage (so forgetting
    between stages is measurable), with difficulties 1-3 for pacing."""
    rng = random.Random(f"{seed}/{stage}")
    question, answer = _TASKS[stage]
    samples = []
    for i in range(count):
        name = f"{rng.choice(['parse', 'load', 'fetch', 'sum', 'walk'])}_{i % 7}"
        fields = {
            "name": name,
            "noun": rng.choice(["lists", "maps"]),
            "k": i % 5,
            "mod": f"Mod{i % 3}",
        }
        samples.append(
            {
                "id": sha256_hex(f"{seed}/{stage}/{i}".encode()),
                "conversations": [
                    {"from": "human", "value": question.format(**fields)},
                    {"from": "gpt", "value": answer.format(**fields)},
                ],
                "meta": {
                    "kind": f"synthetic_stage{stage}",
                    "stage": stage,
                    "difficulty": 1 + i % 3,
                },
            }
        )
    return samples
