"""`exforge demo`: the whole system on the sample corpus, on the embedded stack.

pipeline (ingest the Mix projects and the book → parse → instruct → shard) → train the
tiny model through every stage that has data → register a version → evaluate it on the
built-in benchmark → export it to Triton, serve it and stream one completion.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exforge.core import stack
from exforge.core.db import open_database
from exforge.core.kafka import produce
from exforge.core.settings import PROJECT_ROOT, Settings
from exforge.core.store import ObjectStore, open_store
from schemas.records import SourceRequest
from streams.dataset import stats
from streams.sources.local import upload_directory
from streams.sources.run import upload_book

EXAMPLES = PROJECT_ROOT / "examples"
CORPUS = EXAMPLES / "corpus"
BOOKS = EXAMPLES / "books"
MODEL_NAME = "exforge-elixir"
DEMO_PROMPT = "defmodule Greeter do\n  def hello(name) do"
STEPS_PER_STAGE = 12

Say = Callable[[str], None]


def corpus_projects(corpus: Path = CORPUS) -> list[Path]:
    return sorted(path.parent for path in corpus.glob("*/mix.exs"))


def book_requests(store: ObjectStore, books: Path) -> list[SourceRequest]:
    """The books listed in `books.json` (file, title, license), stored in the store."""
    listing = books / "books.json"
    if not listing.is_file():
        return []
    return [
        upload_book(store, books / entry["file"], entry["title"], entry["license"])
        for entry in json.loads(listing.read_text())
    ]


def run_pipeline(settings: Settings, say: Say, corpus: Path, books: Path) -> dict[str, Any]:
    """Ingest every Mix project of the corpus and the example books, then run the worker
    until the pipeline is idle."""
    store = open_store(settings)
    requests = [upload_directory(store, project) for project in corpus_projects(corpus)]
    if not requests:
        raise FileNotFoundError(f"no Mix projects under {corpus}")
    requests += book_requests(store, books)
    asyncio.run(produce(settings, "sources.requests", [(r.source_id, r) for r in requests]))
    say(f"requested {len(requests)} sources: {', '.join(r.source_id[:40] for r in requests)}")
    say("running the worker until the pipeline is idle")
    worker = subprocess.run(
        [sys.executable, "-m", "exforge", "worker", "--until-idle"],
        # Faust's own INFO chatter drowns the demo's story; EXFORGE_LOG_LEVEL overrides.
        env={"EXFORGE_LOG_LEVEL": "WARNING", **os.environ, "EXFORGE_DATA_DIR": str(settings.root)},
        check=False,
    )
    if worker.returncode != 0:
        raise RuntimeError(f"worker exited with code {worker.returncode}")
    return stats(open_database(settings))


def stage_losses(losses: list[float], stages: list[int]) -> dict[str, dict[str, float]]:
    """First and last training loss of each stage (the demo trains equal steps per stage)."""
    per_stage = len(losses) // max(len(stages), 1)
    return {
        str(stage): {"first": losses[i * per_stage], "last": losses[(i + 1) * per_stage - 1]}
        for i, stage in enumerate(stages)
    }


def train(settings: Settings, say: Say) -> dict[str, Any]:
    """QLoRA on the tiny model through every stage with shards; registers a version."""
    from workers.trainer.data import stages_with_data
    from workers.trainer.recipe import Recipe, StageConfig, TrainConfig

    store = open_store(settings)
    stages = stages_with_data(store, settings.dataset)
    if not stages:
        raise RuntimeError("no training shards: the pipeline produced nothing to train on")
    say(f"training the tiny model (QLoRA, NF4) through stages {stages}")
    config = TrainConfig(
        model="tiny",
        stages=[
            StageConfig(stage=s, steps=STEPS_PER_STAGE, learning_rate=2e-3, warmup_steps=2)
            for s in stages
        ],
        batch_size=2,
        seq_len=512,
        validate_every=STEPS_PER_STAGE,
        register_as=MODEL_NAME,
    )
    summary = Recipe(config, settings, store, open_database(settings)).run()
    version = summary["version"]["version"]
    return {
        "run_id": summary["run_id"],
        "version": version,
        "stages": stage_losses(summary["losses"], stages),
        "final_validation": summary["final_validation"],
    }


def serve_and_generate(settings: Settings, say: Say, version: int) -> str:
    """Export the version for Triton's python backend, serve it, stream one completion."""
    from serving import triton
    from serving.client import stream_completion
    from serving.export import export

    store = open_store(settings)
    exported = export(settings, store, open_database(settings), MODEL_NAME, version, "cpu")
    instance = triton.default_instance(settings)
    say(f"serving {MODEL_NAME} v{version} on Triton (gRPC {instance.grpc_port})")
    triton.start(settings, instance, exported.repository)
    try:
        triton.load(instance, MODEL_NAME, [version])

        async def stream() -> str:
            pieces = []
            async for text in stream_completion(
                [instance.grpc_url], MODEL_NAME, version, DEMO_PROMPT, 16
            ):
                sys.stdout.write(text)
                sys.stdout.flush()
                pieces.append(text)
            sys.stdout.write("\n")
            return "".join(pieces)

        say(f"streaming a completion of {DEMO_PROMPT!r}")
        return asyncio.run(stream())
    finally:
        triton.stop(settings, instance)


def run_demo(
    settings: Settings, say: Say, corpus: Path = CORPUS, books: Path = BOOKS
) -> dict[str, Any]:
    """Stack up → pipeline → train → evaluate → serve → stack down."""
    from workers.evaluator.run import evaluate_for_demo

    started_broker = (
        settings.kafka_bootstrap is None
        and stack.running_pid(stack.broker_pid_file(settings)) is None
    )
    say("starting the stack")
    stack.up(settings)
    try:
        dataset = run_pipeline(settings, say, corpus, books)
        training = train(settings, say)
        say(f"evaluating v{training['version']} on the built-in benchmark")
        evaluation = evaluate_for_demo(settings, MODEL_NAME, training["version"])
        completion = serve_and_generate(settings, say, training["version"])
        return {
            "dataset": dataset,
            "training": training,
            "evaluation": evaluation,
            "completion": completion,
        }
    finally:
        if started_broker:
            say("stopping the stack")
            stack.down(settings)
