"""`exforge worker`: run the stage agents, optionally until the pipeline is idle.

Idle means: every stage input has zero lag for the worker group, no stage has touched a
message for `idle_seconds`, and the shard stage has nothing left to seal or publish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import faust

from exforge.kafka import consumer_lag, create_topics, topic_name
from exforge.settings import Settings
from exforge.telemetry import CONSUMER_LAG, serve_metrics
from schemas.catalogue import STAGE_INPUTS
from streams import shard
from streams.app import build
from streams.stage import StageContext

log = logging.getLogger("exforge.worker")


async def pipeline_lag(settings: Settings) -> int:
    """Total lag of the worker group on the stage inputs (and update the gauge)."""
    inputs = {topic_name(settings, name) for name in STAGE_INPUTS.values()}
    total = 0
    for row in await consumer_lag(settings, groups=[settings.worker_group]):
        CONSUMER_LAG.labels(row.group, row.topic, str(row.partition)).set(row.lag)
        if row.topic in inputs:
            total += row.lag
    return total


async def is_idle(ctx: StageContext, started: float) -> bool:
    settings = ctx.settings
    latest = max(ctx.last_activity.values(), default=started)
    if time.monotonic() - latest < settings.idle_seconds:
        return False
    if any(check() for check in ctx.busy):
        return False
    if await pipeline_lag(settings) > 0:
        return False
    pending = await asyncio.to_thread(shard.pending_samples, ctx.engine)
    unpublished = await asyncio.to_thread(shard.unpublished, ctx.engine)
    return pending == 0 and not unpublished


def run_worker(settings: Settings, stages: Sequence[str], until_idle: bool) -> int:
    """Run a Faust worker in this process; return its exit code."""
    asyncio.run(create_topics(settings))
    ctx = build(settings, stages)
    serve_metrics(settings.metrics_port)
    started = time.monotonic()
    worker = faust.Worker(ctx.app, loglevel=settings.log_level, quiet=True)
    stopping: list[asyncio.Future[None]] = []  # keeps the stop task referenced

    @ctx.app.timer(interval=2.0, name="lag-and-idle-watch")
    async def watch() -> None:
        if stopping:
            return
        try:
            if until_idle and await is_idle(ctx, started):
                log.info("pipeline idle: stopping the worker")
                stopping.append(asyncio.ensure_future(worker.stop()))
            elif not until_idle:
                await pipeline_lag(settings)
        except Exception as exc:  # lag is advisory; the broker may be restarting
            log.warning("lag check failed: %s", exc)

    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0
