"""Parse-stage throughput against bare tree-sitter parsing, on a generated corpus.

    python benchmarks/parse_throughput.py [--files 2000] [--repeat 3]

Generates `--files` Elixir modules (10 to 80 documented functions each, seeded), packs
them into archives of 50 files, then times, in the same process and on the same bytes:

* floor: `tree_sitter` parsing alone of every file;
* stage: what the parse agent does per archive: read the members
  (`streams.parse.elixir_members`) and run every per-file step (`streams.files`:
  encoding, normalisation, redaction, analysis, quality and contamination filters,
  MinHash bands, the `ParsedFile` record).

Prints files/s and MB/s of both and their ratio (each archive's best of `--repeat` runs,
floor and stage alternating archive by archive so both see the same load on a noisy
machine), then where the stage's time goes: each file's steps timed one by one, in the
stage's order (so a step that reuses what an earlier one computed, the tokens' hashes,
is not charged for it), as milliseconds per file and as a multiple of the tree-sitter
parse.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exforge.core.settings import load_settings
from exforge.core.store import FileStore
from exforge.elixir.synthetic import module
from exforge.elixir.tree import parse
from schemas.records import RawPackage
from streams.files import Candidate, Dropped, FileSteps, claim_check, file_outcome, first_drop
from streams.parse import elixir_members

PER_ARCHIVE = 50


def corpus(files: int, seed: int = 11) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [
        (f"lib/m{i}.ex", module(rng, f"Bench.M{i}", rng.randint(10, 80)).source().encode())
        for i in range(files)
    ]


def archive(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in members:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def best_interleaved(
    floor: Callable[[int], object], stage: Callable[[int], object], chunks: int, repeat: int
) -> tuple[float, float]:
    """Seconds of floor and stage over all chunks: each chunk's best of `repeat` runs.

    The two alternate chunk by chunk, so both see the same machine; a burst of load from
    a neighbour spoils one chunk's run, which another repetition replaces."""
    floor_s = [float("inf")] * chunks
    stage_s = [float("inf")] * chunks
    for _ in range(repeat):
        for chunk in range(chunks):
            floor_s[chunk] = min(floor_s[chunk], seconds(partial(floor, chunk)))
            stage_s[chunk] = min(stage_s[chunk], seconds(partial(stage, chunk)))
    return sum(floor_s), sum(stage_s)


def breakdown(
    archives: list[bytes], package: RawPackage, store: FileStore, steps: FileSteps
) -> tuple[dict[str, float], float]:
    """Seconds spent in each per-file step of the stage over every file of `archives`
    (each view of `streams.files.Candidate` forced in the stage's order, then the filter
    list, the record and the claim check), and in bare tree-sitter parsing."""
    spent: dict[str, float] = {}
    floor = 0.0

    def lap(step: str, since: float) -> float:
        now = time.perf_counter()
        spent[step] = spent.get(step, 0.0) + now - since
        return now

    for data in archives:
        started = time.perf_counter()
        members = list(elixir_members(data))
        at = lap("read archive", started)
        for member in members:
            candidate = Candidate(package, member.path, member.data, steps)
            _ = candidate.text
            at = lap("decode", at)
            source = candidate.source
            at = lap("normalise, parse, redact", at)
            _ = candidate.analysis
            at = lap("analysis (module walk, features)", at)
            reason = first_drop(candidate)
            at = lap("filters", at)
            if reason is None:
                claim_check(candidate.record, store, steps.claim_check_bytes)
            at = lap("record (near-dup bands, quality)", at)
            parse(source.data)
            at, floor = time.perf_counter(), floor + time.perf_counter() - at
    return spent, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    files = corpus(args.files)
    size = sum(len(data) for _, data in files)
    archives = [archive(files[i : i + PER_ARCHIVE]) for i in range(0, len(files), PER_ARCHIVE)]
    package = RawPackage(
        source_id="dir:bench@1.0.0",
        kind="dir",
        name="bench",
        version="1.0.0",
        archive_key="unused",
        sha256="0" * 64,
        size_bytes=0,
    )
    steps = FileSteps.from_settings(load_settings())  # default decontamination files
    kept: dict[int, list[bool]] = {}

    def floor(chunk: int) -> None:
        for _, data in files[chunk * PER_ARCHIVE : (chunk + 1) * PER_ARCHIVE]:
            parse(data)

    with tempfile.TemporaryDirectory() as scratch:
        store = FileStore(Path(scratch))

        def stage(chunk: int) -> None:
            kept[chunk] = [
                not isinstance(file_outcome(package, m.path, m.data, store, steps), Dropped)
                for m in elixir_members(archives[chunk])
            ]

        floor_s, stage_s = best_interleaved(floor, stage, len(archives), args.repeat)
        spent, parse_s = breakdown(archives, package, store, steps)

    mb = size / 1e6
    print(f"corpus: {len(files)} files, {mb:.1f} MB, {len(archives)} archives")
    outcomes = [k for chunk in kept.values() for k in chunk]
    print(f"kept by the stage: {sum(outcomes)} of {len(outcomes)}")
    print(f"tree-sitter alone: {len(files) / floor_s:8.0f} files/s {mb / floor_s:6.2f} MB/s")
    print(f"parse stage:       {len(files) / stage_s:8.0f} files/s {mb / stage_s:6.2f} MB/s")
    print(f"ratio (stage / tree-sitter): {floor_s / stage_s:.3f}")
    print("per-file steps (one timed pass):   ms/file   x parse")
    print(f"  {'(tree-sitter parse alone)':30s} {parse_s / len(files) * 1e3:8.3f} {1:8.2f}")
    for step, seconds in spent.items():
        print(f"  {step:30s} {seconds / len(files) * 1e3:8.3f} {seconds / parse_s:8.2f}")
    total = sum(spent.values())
    print(f"  {'all steps':30s} {total / len(files) * 1e3:8.3f} {total / parse_s:8.2f}")


if __name__ == "__main__":
    main()
