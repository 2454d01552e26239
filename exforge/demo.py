"""`exforge demo`: the whole pipeline on the sample corpus, on the embedded stack."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exforge import stack
from exforge.dataset import stats
from exforge.db import open_database
from exforge.kafka import produce
from exforge.settings import Settings
from exforge.store import open_store
from streams.sources.local import upload_directory

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "corpus"


def corpus_projects(corpus: Path = CORPUS) -> list[Path]:
    return sorted(path.parent for path in corpus.glob("*/mix.exs"))


def run_demo(
    settings: Settings, say: Callable[[str], None], corpus: Path = CORPUS
) -> dict[str, Any]:
    """Stack up → ingest the corpus → worker until idle → stats → stack down."""
    started_broker = (
        settings.kafka_bootstrap is None
        and stack.running_pid(stack.broker_pid_file(settings)) is None
    )
    say("starting the stack")
    stack.up(settings)
    try:
        store = open_store(settings)
        requests = [upload_directory(store, project) for project in corpus_projects(corpus)]
        if not requests:
            raise FileNotFoundError(f"no Mix projects under {corpus}")
        asyncio.run(produce(settings, "sources.requests", [(r.source_id, r) for r in requests]))
        say(f"requested {len(requests)} projects: {', '.join(r.source_id for r in requests)}")
        say("running the worker until the pipeline is idle")
        worker = subprocess.run(
            [sys.executable, "-m", "exforge.cli", "worker", "--until-idle"],
            # Faust's own INFO chatter drowns the demo's story; EXFORGE_LOG_LEVEL overrides.
            env={
                "EXFORGE_LOG_LEVEL": "WARNING",
                **os.environ,
                "EXFORGE_DATA_DIR": str(settings.root),
            },
            check=False,
        )
        if worker.returncode != 0:
            raise RuntimeError(f"worker exited with code {worker.returncode}")
        return stats(open_database(settings))
    finally:
        if started_broker:
            say("stopping the stack")
            stack.down(settings)
