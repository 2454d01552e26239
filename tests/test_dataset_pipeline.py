"""Every generator through the real pipeline (broker, worker, BEAM check pool, store, DB):
a corpus project and a book become checked, graded, tokenised shards; re-ingesting the
same input changes no shard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, Pipeline
from test_sources_books import make_pdf

from exforge.core.store import open_store, sha256_hex
from schemas.shards import decode_shard
from streams.generators import KINDS

pytestmark = pytest.mark.slow

PROJECTS = [REPO / "examples" / "corpus" / name for name in ("kv_cache", "text_tools")]


def ingest_all(pipeline: Pipeline, book: Path) -> None:
    for project in PROJECTS:
        pipeline.json("ingest", "dir", str(project))
    pipeline.json("ingest", "book", str(book), "--license", "CC0-1.0")
    pipeline.run_until_idle()


def test_all_kinds_through_the_pipeline_and_reprocessing_changes_no_shard(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    every = Pipeline({**pipeline.env, "EXFORGE_INSTRUCT_KINDS": "", "EXFORGE_SHARD_SAMPLES": "16"})
    book = tmp_path / "book.pdf"
    book.write_bytes(make_pdf())
    ingest_all(every, book)

    stats = every.json("dataset", "stats")
    kinds = set(stats["samples"]["by_kind"])
    assert kinds == set(KINDS), kinds
    assert stats["samples"]["pending"] == 0
    assert stats["tokens"]["samples"] == stats["tokens"]["in_shards"] > 0
    assert set(stats["samples"]["dropped_by_reason"]) <= {"compile_failed", "tests_failed"}

    store = open_store(every.settings)
    shards = {k: sha256_hex(store.get(k)) for k in store.list("shards/")}
    ids = []
    for key in (k for k in shards if k.endswith("manifest.json")):
        manifest = json.loads(store.get(key))
        for entry in manifest["shards"]:
            rows = decode_shard(store.get(entry["key"]))
            assert (entry["samples"], entry["sha256"]) == (len(rows), shards[entry["key"]])
            ids += [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == stats["shards"]["samples"] == stats["samples"]["total"]

    ingest_all(every, book)
    assert {k: sha256_hex(store.get(k)) for k in store.list("shards/")} == shards
    assert every.json("dataset", "stats")["shards"] == stats["shards"]
