"""How a group's shard manifest scales: the shard stage rewrites it at every seal.

For each group size of `--shards` (S shards of `--size` samples each, in a fresh SQLite
ledger and file store), the samples are staged and sealed by the shard stage's own
functions, then `streams.shard.manifest` is timed (median of `--repeats`). Printed:
milliseconds per manifest, microseconds per member sample and per shard, and the
per-member cost of the largest group over the smallest: near 1 when a manifest is linear
in its members, above 1 when it grows faster. A manifest reads only the group's shard
rows, so its cost follows the shards, whatever `--size`.

Usage: python benchmarks/shard_manifest.py [--shards 40,120] [--size 500] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.db import engine_for
from exforge.core.store import FileStore
from streams.shard import manifest, seal, stage_samples
from tests.support.records import train_samples


def measure(shards: int, size: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as root:
        engine = engine_for(f"sqlite:///{root}/ledger.db")
        store = FileStore(Path(root) / "store")
        samples = train_samples(shards * size, difficulties=5)
        stage_samples(engine, "bench", [(sample, 10) for sample in samples])
        sealed = seal(engine, store, "bench", size, flush=True)
        assert sealed == shards, f"sealed {sealed} of {shards}"
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            manifest(engine, "bench", 1, "train")
            times.append(time.perf_counter() - started)
        engine.dispose()
    seconds = statistics.median(times)
    return {
        "shards": shards,
        "members": shards * size,
        "seconds": round(seconds, 5),
        "us_per_member": round(seconds / (shards * size) * 1e6, 3),
        "us_per_shard": round(seconds / shards * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="40,120", help="Group sizes, comma-separated.")
    parser.add_argument("--size", type=int, default=500, help="Samples per shard.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    rows = [measure(int(s), args.size, args.repeats) for s in args.shards.split(",")]
    growth = round(rows[-1]["us_per_member"] / rows[0]["us_per_member"], 2)
    if args.json:
        print(json.dumps({"runs": rows, "per_member_growth": growth}))
        return
    for row in rows:
        print(
            f"{row['shards']:5d} shards, {row['members']:7d} members: "
            f"{row['seconds'] * 1e3:.2f} ms a manifest, {row['us_per_member']:.3f} µs a member, "
            f"{row['us_per_shard']:.1f} µs a shard"
        )
    print(f"per-member cost, largest group over smallest: {growth}x (1: linear)")


if __name__ == "__main__":
    main()
