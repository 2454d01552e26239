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
from schemas.shards import curriculum, decode_shard, difficulty, manifest_key


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
