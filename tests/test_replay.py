"""Disaster drill (b): the broker loses its data after ingest, before the other stages ran;
`exforge replay raw` re-produces `raw.packages` from the ledger and the stored archives,
and the re-driven pipeline counts the project exactly (no sample lost); replaying again
changes no shard (no sample duplicated)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, Pipeline
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exforge.core.db import Package, open_database
from exforge.core.store import open_store, sha256_hex

pytestmark = pytest.mark.slow

UNSEEN = REPO / "tests" / "fixtures" / "unseen_project"
EXPECTED = json.loads((UNSEEN / "EXPECTED.json").read_text())
INGEST_TIMEOUT_S = 120


def ingest_only(pipeline: Pipeline, log: Path) -> None:
    """Run the ingest stage alone until the ledger records the requested package."""
    worker = pipeline.start_worker("--stages", "ingest", log=log)
    engine = open_database(pipeline.settings)
    deadline = time.monotonic() + INGEST_TIMEOUT_S
    try:
        while True:
            with Session(engine) as session:
                if session.scalar(select(func.count()).select_from(Package)):
                    return
            assert worker.poll() is None, f"the ingest worker exited; see {log}"
            assert time.monotonic() < deadline, f"nothing ingested in {INGEST_TIMEOUT_S}s"
            time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(60)


def lose_the_brokers_data(pipeline: Pipeline) -> None:
    """A new topic prefix: empty topics, no committed offsets, no table changelogs."""
    pipeline.env["EXFORGE_TOPIC_PREFIX"] = f"t{uuid.uuid4().hex[:10]}."
    pipeline.cli("topics", "create")


def test_drill_lost_broker_data_is_re_driven_from_the_store(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.json("ingest", "dir", str(UNSEEN))
    ingest_only(pipeline, tmp_path / "ingest.log")
    assert pipeline.json("dataset", "stats")["packages"] == 1
    lose_the_brokers_data(pipeline)

    assert pipeline.json("replay", "raw") == {"sent": 1, "missing": [], "changed": []}
    pipeline.run_until_idle()
    stats = pipeline.json("dataset", "stats")
    assert stats["files"]["kept"] == EXPECTED["kept_files"]
    assert stats["files"]["dropped_by_reason"] == EXPECTED["dropped_by_reason"]
    assert stats["samples"]["total"] == EXPECTED["documented_public_functions"]
    assert stats["shards"]["samples"] == EXPECTED["documented_public_functions"]

    store = open_store(pipeline.settings)
    shards = {k: sha256_hex(store.get(k)) for k in store.list("shards/")}
    lose_the_brokers_data(pipeline)
    assert pipeline.json("replay", "raw")["sent"] == 1
    pipeline.run_until_idle()
    assert {k: sha256_hex(store.get(k)) for k in store.list("shards/")} == shards
    assert pipeline.json("dataset", "stats") == stats


def test_replay_reports_a_missing_archive_and_exits_1(pipeline: Pipeline, tmp_path: Path) -> None:
    requested = pipeline.json("ingest", "dir", str(UNSEEN))
    ingest_only(pipeline, tmp_path / "ingest.log")
    open_store(pipeline.settings).delete(requested["archive_key"])
    result = pipeline.cli("replay", "raw", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "sent": 0,
        "missing": [requested["source_id"]],
        "changed": [],
    }
