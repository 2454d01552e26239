"""Worker processes sharing one SQLite ledger late in a run: does sealing serialise them?

A fresh SQLite ledger and file store get one group (stage 1, train) holding `--sealed`
samples already sealed in shards of `--size`. Then `--processes` processes (one run per
count) each stage an equal share of `--new` more samples in batches of 256 (the shard
stage's batch) and seal full shards after each batch (as its timer does while samples
wait), all starting together. Printed per process count: samples/s over the slowest
process, and per process its time, shards sealed, time sealing, and time waiting for
SQLite's write lock (every ledger transaction on SQLite begins IMMEDIATE, reads
included). With two processes, whatever one holds the lock for the other waits out.

Usage: python benchmarks/shard_contention.py [--processes 1,2] [--sealed 60000]
    [--new 10000] [--size 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Connection, event

from exforge.core import db
from exforge.core.store import FileStore
from schemas.records import InstructionSample
from streams.shard import BATCH_SAMPLES, seal, stage_samples
from tests.support.records import train_samples

TOKENS = 10  # per sample: the token limit is not what closes these shards
STAGED_AT_ONCE = 5000  # samples staged in one transaction when filling the group


def worker(
    url: str,
    root: str,
    values: list[str],
    size: int,
    results: Any,
    barrier: Any,
) -> None:
    engine = db.engine_for(url)  # migrated: timing starts with the stage's own transactions
    waited = [0.0]

    def timed_begin(connection: Connection) -> None:
        started = time.perf_counter()
        db._sqlite_begin(connection)
        waited[0] += time.perf_counter() - started

    event.remove(engine, "begin", db._sqlite_begin)
    event.listen(engine, "begin", timed_begin)
    store = FileStore(Path(root) / "store")
    samples = [InstructionSample.model_validate_json(v) for v in values]
    barrier.wait()
    started = time.perf_counter()
    sealed, sealing = 0, 0.0
    for first in range(0, len(samples), BATCH_SAMPLES):
        batch = samples[first : first + BATCH_SAMPLES]
        stage_samples(engine, "bench", [(s, TOKENS) for s in batch])
        seal_started = time.perf_counter()
        sealed += seal(engine, store, "bench", size, flush=False)
        sealing += time.perf_counter() - seal_started
    results.put(
        {
            "seconds": round(time.perf_counter() - started, 2),
            "sealed": sealed,
            "sealing_s": round(sealing, 2),
            "lock_wait_s": round(waited[0], 2),
        }
    )


def measure(processes: int, sealed: int, new: int, size: int) -> dict[str, Any]:
    samples = train_samples(sealed + new, difficulties=5)
    with tempfile.TemporaryDirectory() as root:
        url = f"sqlite:///{root}/ledger.db"
        engine = db.engine_for(url)
        store = FileStore(Path(root) / "store")
        for first in range(0, sealed, STAGED_AT_ONCE):
            chunk = samples[first : min(first + STAGED_AT_ONCE, sealed)]
            stage_samples(engine, "bench", [(s, TOKENS) for s in chunk])
        seal(engine, store, "bench", size, flush=False)
        engine.dispose()
        spawn = multiprocessing.get_context("spawn")
        results = spawn.Queue()
        barrier = spawn.Barrier(processes)
        values = [s.model_dump_json(by_alias=True) for s in samples[sealed:]]
        workers = [
            spawn.Process(
                target=worker, args=(url, root, values[k::processes], size, results, barrier)
            )
            for k in range(processes)
        ]
        for process in workers:
            process.start()
        runs = [results.get() for _ in workers]
        for process in workers:
            process.join()
    slowest = max(run["seconds"] for run in runs)
    return {"processes": processes, "samples_per_s": round(new / slowest, 1), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2", help="Process counts, comma-separated.")
    parser.add_argument("--sealed", type=int, default=60000, help="Samples sealed before.")
    parser.add_argument("--new", type=int, default=10000, help="Samples staged and sealed.")
    parser.add_argument("--size", type=int, default=512, help="Samples per shard.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    rows = [measure(int(p), args.sealed, args.new, args.size) for p in args.processes.split(",")]
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['processes']} process(es): {row['samples_per_s']:.0f} samples/s")
        for run in row["runs"]:
            print(
                f"  {run['seconds']:.2f} s, {run['sealed']} shards sealed in "
                f"{run['sealing_s']:.2f} s, {run['lock_wait_s']:.2f} s waiting for the lock"
            )


if __name__ == "__main__":
    main()
