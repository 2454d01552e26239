"""All of Hex on one machine, projected: a local Hex stand-in serving N packages made
from the real corpus, crawled through `exforge ingest hex` and processed to shards.

    python benchmarks/hex_scale.py [--packages 2000] [--processes 2]
        [--table-store rocksdb] [--project 17000] [--seed 0] [--work-dir DIR]
        [--checkout DIR] [--set KEY=VALUE ...] [--json]

The packages: package i takes a library of `../shared/corpus/` and a random subset of
its `.ex`/`.exs` files, with the library's own identifiers renamed with a per-package
suffix (`benchmarks/corpus.py`), so its files are new to exact and near-duplicate
detection. Sizes are log-normal (median `--median-files` files, sigma `--sigma`, capped
at the library's size), a heavy tail like a registry's: many small packages, a few
large ones. A share `--near-dup-share` of the files are near-duplicates of a file of an
earlier package from the same library (its renaming applied to only 85 % of the names,
as a vendored or forked copy drifts), placed under the package's own path. Tarballs
are real Hex format-3 tarballs served by `tests/servers/hex.py` (the server the crawl
tests use), with its API rate limit out of the way: the crawl's own cost is measured,
and the API requests it needs are counted.

The run: a fresh embedded broker, file store and SQLite ledger; `exforge ingest hex
--top N` crawls the stand-in (list pages, one release call and one tarball per
package), then `exforge worker --until-idle --processes P` processes everything to
shards. Printed: crawl and processing time, files/s and samples/s, the stage breakdown
of `benchmarks/pipeline_throughput.py`, each worker's peak RSS, the size of the
dedup and near-dup state (the workers' RocksDB tables on disk and the table changelog
topics' message count), and the time for `--project` packages: the crawl and the
workers' active time scaled per package (added, as they ran one after the other here),
plus the workers' start-up and final idle check once. `--checkout DIR` crawls and
processes with another checkout of exforge (with this venv): runs of two checkouts,
alternated, compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from aiokafka import TopicPartition
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords
from servers.hex import HexRegistry, Package, Release, hex_server, hex_tarball

from benchmarks.corpus import REPO, Renaming, renaming, source_files, unpack
from benchmarks.pipeline_throughput import (
    embedded_stack,
    parse_common,
    process,
    show,
    summary,
    worker_env,
)
from exforge.core.kafka import end_offsets, metadata_consumer
from exforge.core.settings import Settings

NEAR_DUP_RENAMED = 0.85  # share of a package's names a near-duplicate copy renames


@dataclass
class Library:
    name: str
    root: Path
    files: list[Path]
    renaming: Renaming  # suffix replaced per package

    def text(self, path: Path, rename: Renaming) -> str:
        return rename.apply(path.read_text(errors="replace"))

    def for_package(self, suffix: str) -> Renaming:
        return Renaming(self.renaming.functions, self.renaming.segments, suffix)


@dataclass
class Built:
    """A package of the stand-in: its library, suffix and chosen files."""

    name: str
    library: Library
    suffix: str
    files: list[Path]


def package_size(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def build_packages(
    libraries: list[Library],
    count: int,
    median: float,
    sigma: float,
    near_dup_share: float,
    seed: int,
) -> tuple[HexRegistry, dict[str, int]]:
    """The registry of `count` packages, and counts of what went into it."""
    rng = random.Random(seed)
    registry = HexRegistry(rate_limit=10**9)
    built: list[Built] = []
    counts = {"files": 0, "near_duplicates": 0, "bytes": 0}
    for index in range(count):
        library = libraries[index % len(libraries)]
        size = package_size(rng, median, sigma, len(library.files))
        chosen = sorted(rng.sample(library.files, size))
        name = f"{library.name}_p{index:05d}"
        package = Built(name, library, f"p{index:05d}", chosen)
        rename = library.for_package(package.suffix)
        files: dict[str, bytes] = {}
        earlier = [b for b in built if b.library is library]
        for path in chosen:
            relative = str(path.relative_to(library.root))
            if earlier and rng.random() < near_dup_share:
                source = rng.choice(earlier)
                original = rng.choice(source.files)
                drift = library.for_package(source.suffix).partial(rng, NEAR_DUP_RENAMED)
                text = library.text(original, drift)
                relative = f"lib/{name}/copied_{original.name}"
                counts["near_duplicates"] += 1
            else:
                text = library.text(path, rename)
            files[relative] = text.encode()
        files["mix.exs"] = (
            f"defmodule {name.title().replace('_', '')}.MixProject do\n  use Mix.Project\n\n"
            f'  def project, do: [app: :{name}, version: "1.0.0"]\nend\n'
        ).encode()
        tarball = hex_tarball(name, "1.0.0", files)
        registry.add(Package(name, [Release("1.0.0", tarball)], downloads=10**6 - index))
        built.append(package)
        counts["files"] += len(files) - 1
        counts["bytes"] += len(tarball)
    return registry, counts


async def stored_batches(settings: Settings) -> dict[str, list[int]]:
    """[record batches, records, largest batch's keys and values in bytes, all batches'
    keys and values in bytes] each topic holds, read back with plain fetches: the broker
    lists every stored batch of a partition on each fetch of it that returns records, so
    this, not the record count, is what its fetch work grows with."""
    async with metadata_consumer(settings) as consumer:
        client = consumer._client
        partitions = [
            TopicPartition(t, p)
            for t in sorted(await consumer.topics())
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        ends = await end_offsets(consumer, partitions)
        counts: dict[str, list[int]] = {tp.topic: [0, 0, 0, 0] for tp in partitions}
        for tp in partitions:
            node = client.cluster.leader_for_partition(tp)
            offset = 0
            while offset < ends[tp]:
                # (Tansu answers a fetch of max_wait 0 with no topics at all)
                request = FetchRequest(
                    500, 1, 64 * 2**20, 0, [(tp.topic, [(tp.partition, offset, 64 * 2**20)])]
                )
                response = await client.send(node, request)
                if not response.topics:
                    raise RuntimeError(f"fetch {tp} at {offset}: {response}")
                _, error, _, *_, data = response.topics[0][1][0]
                if error:
                    raise RuntimeError(f"fetch {tp} at {offset}: error {error}")
                found, fetched_from = MemoryRecords(data), offset
                while (batch := found.next_batch()) is not None:
                    records = [r for r in batch if r.offset >= offset]
                    if records:
                        size = sum(len(r.key or b"") + len(r.value or b"") for r in records)
                        counts[tp.topic][0] += 1
                        counts[tp.topic][1] += len(records)
                        counts[tp.topic][2] = max(counts[tp.topic][2], size)
                        counts[tp.topic][3] += size
                        offset = records[-1].offset + 1
                if offset == fetched_from:
                    raise RuntimeError(f"fetch {tp} at {offset}: no records before {ends[tp]}")
    return counts


def crawl(
    settings: Settings,
    checkout: Path,
    api: str,
    repo: str,
    packages: int,
    log: Path,
    overrides: dict[str, str],
) -> dict[str, Any]:
    env = worker_env(settings, checkout, overrides=overrides)
    env.update(EXFORGE_HEX_API_URL=api, EXFORGE_HEX_REPO_URL=repo)
    command = [sys.executable, "-m", "exforge", "ingest", "hex", "--top", str(packages)]
    started = time.monotonic()
    with log.open("ab") as errors:
        out = subprocess.run(
            [*command, "--json"], env=env, cwd=checkout, stdout=subprocess.PIPE, stderr=errors
        )
    seconds = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"crawl exited {out.returncode}; see {log}")
    return {"seconds": round(seconds, 1), "summary": json.loads(out.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packages", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--table-store", choices=("memory", "rocksdb"), default="rocksdb")
    parser.add_argument("--project", type=int, default=17_000, help="Packages to project to.")
    parser.add_argument("--median-files", type=float, default=8.0)
    parser.add_argument("--sigma", type=float, default=1.2)
    parser.add_argument("--near-dup-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkout", type=Path, default=REPO, help="exforge to run.")
    args = parse_common(parser)
    work = Path(tempfile.mkdtemp(prefix="hex-scale-", dir=args.work_dir))
    try:
        libraries = [
            Library(p.name, p, [f for f in source_files(p) if f != p / "mix.exs"], renaming(p, ""))
            for p in unpack(args.corpus, work / "corpus")
        ]
        built_at = time.monotonic()
        registry, made = build_packages(
            libraries,
            args.packages,
            args.median_files,
            args.sigma,
            args.near_dup_share,
            args.seed,
        )
        made["build_s"] = round(time.monotonic() - built_at, 1)
        root = work / "run"
        root.mkdir()
        log = root / "workers.log"
        with hex_server(registry) as (api, repo), embedded_stack(root) as settings:
            checkout = args.checkout.resolve()
            crawled = crawl(settings, checkout, api, repo, args.packages, log, args.overrides)
            processed = process(
                settings,
                checkout,
                args.processes,
                "processes",
                args.table_store,
                log,
                args.overrides,
            )
            batches = asyncio.run(stored_batches(settings))
        # the dedup and near-dup state as replicated
        changelog = sum(n for t, (_, n, _, _) in batches.items() if t.endswith("-changelog"))
        run = summary(processed, args.processes)
        run.update(
            launch="processes", table_store=args.table_store, copies=1, settings=args.overrides
        )
        run["packages"] = args.packages
        # start-up and the final idle check happen once; crawl and active time scale
        fixed_s = processed.wall_s - run["active_s"]
        per_package_s = (crawled["seconds"] + run["active_s"]) / args.packages
        report = {
            "packages": args.packages,
            "made": made,
            "api_requests": sum(registry.api_requests.values()),
            "crawl": crawled,
            "run": run,
            "changelog_messages": changelog,
            "stored_batches": batches,
            "wall_s": round(crawled["seconds"] + processed.wall_s, 1),
            "projected": {
                "packages": args.project,
                "hours": round((fixed_s + per_package_s * args.project) / 3600, 2),
                "crawl_hours": round(crawled["seconds"] / args.packages * args.project / 3600, 2),
                "dedup_state_mb": round(run["tables_mb"] * args.project / args.packages, 1),
            },
        }
        if args.json:
            print(json.dumps(report, indent=2))
            return
        print(
            f"stand-in: {args.packages} packages, {made['files']} files "
            f"({made['near_duplicates']} planted near-duplicates), "
            f"{made['bytes'] / 2**20:.1f} MiB of tarballs (built in {made['build_s']} s)"
        )
        print(
            f"crawl: {crawled['seconds']} s, {report['api_requests']} API requests: "
            f"{json.dumps(crawled['summary'])[:300]}"
        )
        show(run)
        print(
            f"  dedup state: {run['tables_mb']} MB of tables on disk, "
            f"{changelog} changelog messages"
        )
        listed = sum(b for b, _, _, _ in batches.values())
        print(
            f"  stored: {listed} record batches of {sum(r for _, r, _, _ in batches.values())} "
            "records; by topic (batches/records, largest batch KiB/all MiB): "
            + ", ".join(
                f"{t} {b}/{r} {m / 1024:.0f}/{a / 2**20:.1f}"
                for t, (b, r, m, a) in sorted(batches.items())
                if r
            )
        )
        projected = report["projected"]
        print(
            f"\ncrawl + processing: {report['wall_s']} s for {args.packages} packages; "
            f"projected for {args.project}: {projected['hours']} h "
            f"(crawl {projected['crawl_hours']} h), dedup state ~{projected['dedup_state_mb']} MB"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
