"""Training data without the pipeline: small synthetic ShareGPT samples, written as shards
and manifests in the shard stage's format, for the trainer's tests and benchmarks."""

from __future__ import annotations

import json
import random
from typing import Any

from exforge.core.store import ObjectStore, sha256_hex
from schemas.shards import FORMAT, encode_shard, manifest_key, shard_key


def write_split(
    store: ObjectStore,
    dataset: str,
    stage: int,
    split: str,
    samples: list[dict[str, Any]],
    shard_samples: int,
) -> dict[str, Any]:
    """Write samples as shards + manifest in the shard stage's format: a training corpus
    without running the pipeline."""
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
