"""Near-duplicate removal in the stream: the same kept/dropped sets with one worker on one
partition and with two workers on four partitions (real broker, real worker processes)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import Pipeline
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_pipeline import send, write_project

from exforge.db import FileOutcome, open_database
from exforge.kafka import read_all
from exforge.store import open_store
from schemas.records import ParsedFile, RawPackage
from streams.elixir.neardup import batch_decisions
from streams.elixir.synthetic import module, recommented, renamed, reordered
from streams.files import analysed_file
from streams.sources.local import upload_directory

pytestmark = pytest.mark.slow

PACKAGES = 4
FAMILIES = 5
DISTINCT = 6
WORKER_TIMEOUT_S = 240


def corpus(root: Path) -> list[Path]:
    """Four projects: five families (a module and three near-duplicate variants, spread
    over packages and within one), six distinct modules, one exact copy."""
    rng = random.Random(7)
    files: list[dict[str, str]] = [{} for _ in range(PACKAGES)]
    for family in range(FAMILIES):
        base = module(rng, f"Family{family}")
        variants = (base, renamed(rng, base), reordered(rng, base), recommented(rng, base))
        for offset, variant in enumerate(variants):
            package = (family + (0 if offset == 3 else offset)) % PACKAGES
            files[package][f"lib/family{family}_v{offset}.ex"] = variant.source()
    for index in range(DISTINCT):
        files[index % PACKAGES][f"lib/distinct{index}.ex"] = module(rng, f"D{index}").source()
    files[0]["lib/copy_of_distinct0.ex"] = files[0]["lib/distinct0.ex"]
    return [write_project(root / f"p{i}", f"p{i}", f) for i, f in enumerate(files)]


def isolated(pipeline: Pipeline, tmp_path: Path, partitions: int) -> Pipeline:
    env = {
        **pipeline.env,
        "EXFORGE_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "EXFORGE_DATA_DIR": str(tmp_path / f"data-{partitions}"),
        "EXFORGE_TOPIC_PARTITIONS": str(partitions),
    }
    return Pipeline(env)


def run(pipeline: Pipeline, projects: list[Path], workers: int, log: Path) -> None:
    store = open_store(pipeline.settings)
    requests = [upload_directory(store, p) for p in projects]
    send(pipeline, "sources.requests", [(r.source_id, r) for r in requests])
    procs = [pipeline.start_worker("--until-idle", log=log) for _ in range(workers)]
    try:
        for proc in procs:
            assert proc.wait(timeout=WORKER_TIMEOUT_S) == 0, log.read_text()[-4000:]
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers did not finish:\n{log.read_text()[-4000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def expected_near_duplicates(projects: list[Path]) -> set[str]:
    """Paths the pure rules (`neardup.batch_decisions`) drop as near-duplicates."""
    bands: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for project in projects:
        for path in sorted(project.glob("lib/*.ex")):
            file = analysed_file(package_stub(project.name), path.name, path.read_text())
            assert file is not None
            bands[file.sha256] = file.near_dup.bands
            paths.setdefault(file.sha256, f"lib/{path.name}")
    return {paths[sha] for sha, cluster in batch_decisions(bands).items() if cluster}


def package_stub(name: str) -> RawPackage:
    return RawPackage(
        source_id=f"dir:{name}@1.0.0",
        kind="dir",
        name=name,
        version="1.0.0",
        archive_key="unused",
        sha256="0" * 64,
        size_bytes=0,
    )


def outcomes(pipeline: Pipeline) -> dict[tuple[str, str], str]:
    """(source id, path) → "kept" or the drop reason."""
    with Session(open_database(pipeline.settings)) as session:
        rows = session.scalars(select(FileOutcome)).all()
        return {(r.source_id, r.path): r.reason or "kept" for r in rows}


def parsed(pipeline: Pipeline) -> list[ParsedFile]:
    records = asyncio.run(read_all(pipeline.settings, "parsed.files"))
    return [ParsedFile.model_validate_json(r.value) for r in records]


def test_kept_and_dropped_sets_do_not_depend_on_workers_or_partitions(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    projects = corpus(tmp_path / "projects")
    single = isolated(pipeline, tmp_path, partitions=1)
    run(single, projects, workers=1, log=tmp_path / "single.log")
    double = isolated(pipeline, tmp_path, partitions=4)
    run(double, projects, workers=2, log=tmp_path / "double.log")

    first, second = outcomes(single), outcomes(double)
    assert first == second
    near = {path for (_, path), reason in first.items() if reason == "near_duplicate"}
    assert near == expected_near_duplicates(projects)
    assert len(near) >= 3 * FAMILIES - 2  # LSH misses a pair now and then, not more
    reasons = sorted(first.values())
    assert reasons.count("exact_duplicate") == 1
    assert reasons.count("too_short") == PACKAGES  # the four-line mix.exs files
    assert reasons.count("kept") == len(first) - len(near) - 1 - PACKAGES
    for family in range(FAMILIES):  # one file of each family is kept
        assert any(
            r == "kept" for (_, p), r in first.items() if p.startswith(f"lib/family{family}_")
        )

    files = parsed(single)
    assert len(files) == reasons.count("kept")
    assert all(f.near_dup.cluster == f.sha256 for f in files)
    assert {f.sha256 for f in files} == {f.sha256 for f in parsed(double)}
