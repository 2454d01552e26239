"""How soon a fresh `exforge worker` consumes: seconds from process start to the first
`raw.packages` record, on the embedded broker (the first Faust rebalance dominates).

    .venv/bin/python benchmarks/worker_startup.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import TopicPartition

from exforge.core import stack
from exforge.core.kafka import create_topics, metadata_consumer, produce
from exforge.core.settings import Settings, load_settings
from exforge.core.store import open_store
from schemas.catalogue import topic_name
from streams.sources.local import upload_directory

REPO = Path(__file__).resolve().parent.parent
PROJECT = REPO / "tests" / "fixtures" / "unseen_project"


async def end_offset(settings: Settings, topic: str) -> int:
    name = topic_name(settings.topic_prefix, topic)
    async with metadata_consumer(settings) as consumer:
        await consumer.topics()
        partitions = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
        return sum((await consumer.end_offsets(partitions)).values())


def one_run(base: Settings, data_dir: Path) -> float:
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    settings = base.model_copy(update={"topic_prefix": prefix, "data_dir": data_dir})
    asyncio.run(create_topics(settings))
    request = upload_directory(open_store(settings), PROJECT)
    asyncio.run(produce(settings, "sources.requests", [(request.source_id, request)]))
    env = {
        **os.environ,
        "EXFORGE_KAFKA_BOOTSTRAP": settings.bootstrap,
        "EXFORGE_TOPIC_PREFIX": prefix,
        "EXFORGE_DATA_DIR": str(data_dir),
        "EXFORGE_METRICS_PORT": "0",
        "EXFORGE_LOG_LEVEL": "WARNING",
    }
    started = time.monotonic()
    worker = subprocess.Popen(
        [sys.executable, "-m", "exforge", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while asyncio.run(end_offset(settings, "raw.packages")) == 0:
            if time.monotonic() - started > 120:
                raise TimeoutError("the worker consumed nothing within 120 s")
            time.sleep(0.1)
        return time.monotonic() - started
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_settings(
            data_dir=Path(tmp), embedded_kafka_port=int(os.environ.get("BENCH_KAFKA_PORT", "29093"))
        )
        stack.start_broker(base)
        try:
            times = [one_run(base, Path(tmp) / f"run{i}") for i in range(args.runs)]
        finally:
            stack.down(base)
    print(
        f"worker start → first record consumed and produced: "
        f"median {statistics.median(times):.1f} s, runs {', '.join(f'{t:.1f}' for t in times)}"
    )


if __name__ == "__main__":
    main()
