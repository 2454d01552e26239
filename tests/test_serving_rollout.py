"""Rollout mechanics on the registry (SQLite and PostgreSQL): gradual steps, p95 rollback,
the response cache and its invalidation on a version change (the gateway's own refresh
path)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import Engine

from exforge.core.db import engine_for
from exforge.core.settings import load_settings
from exforge.llm.registry import get_version, register_version
from serving import rollout
from serving.cache import CachedCompletion, CacheKey, ResponseCache
from serving.contract import LlmRequest
from serving.gateway import Gateway

MODEL = "m"


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = engine_for(database_url)
    for _ in range(3):
        register_version(engine, MODEL, "tiny", "models/m/x/adapter.safetensors", None, {})
    return engine


def gateway(engine: Engine, tmp_path: Path, **settings: object) -> Gateway:
    config = load_settings(
        data_dir=tmp_path, rollback_min_requests=5, rollback_p95_s=0.5, **settings
    )
    return Gateway(config, engine, urls=["127.0.0.1:1"])  # the pool is never started


def key(version: int, prompt: str = "defmodule") -> CacheKey:
    return CacheKey(MODEL, version, LlmRequest(prompt, 8))


def test_response_cache_is_lru_and_invalidates_per_model() -> None:
    cache = ResponseCache(entries=2)
    cache.put(key(1, "a"), CachedCompletion(("x",)))
    cache.put(key(1, "b"), CachedCompletion(("y",)))
    assert cache.get(key(1, "a")) is not None  # "a" is now the most recent
    cache.put(key(1, "c"), CachedCompletion(("z", "!")))
    assert cache.get(key(1, "b")) is None and cache.get(key(1, "c")).text == "z!"
    other = CacheKey("other", 1, LlmRequest("a", 8))
    cache.put(other, CachedCompletion(("o",)))
    assert cache.invalidate(MODEL) == 1
    assert cache.get(other) is not None and cache.get(key(1, "a")) is None
    assert ResponseCache(entries=0).get(key(1)) is None


def test_p95_latency_over_the_window_asks_for_a_rollback() -> None:
    limits = rollout.Thresholds(window_s=60, min_requests=10, error_rate=0.5, p95_s=1.0)
    window = rollout.HealthWindow(60)
    for _ in range(9):
        window.add(True, 0.2)
    assert window.verdict(limits) is None  # below min_requests
    window.add(True, 0.2)
    assert window.verdict(limits) is None  # p95 0.2 s
    for _ in range(10):
        window.add(True, 3.0)
    reason = window.verdict(limits)
    assert reason is not None and reason.startswith("p95 latency 3.00s over 20 requests")
    failing = rollout.HealthWindow(60)
    for ok in [False] * 6 + [True] * 4:
        failing.add(ok, 0.1)
    assert failing.verdict(limits).startswith("error rate 60% over 10 requests")


def test_gradual_steps_advance_while_healthy_and_promote_at_100(
    engine: Engine, tmp_path: Path
) -> None:
    rollout.promote(engine, MODEL, 1)
    rollout.split(engine, MODEL, 2, 10, steps=[50, 100], step_interval_s=0)
    gw = gateway(engine, tmp_path)

    async def healthy_refresh() -> None:
        for _ in range(5):
            await gw._observe(MODEL, 2, True, 0.1)
        await gw.refresh()

    async def run() -> list[rollout.RolloutState]:
        await gw.refresh()
        seen = []
        for _ in range(2):
            await healthy_refresh()
            seen.append(rollout.get_state(engine, MODEL))
        return seen

    after_first, after_second = asyncio.run(run())
    assert (after_first.canary, after_first.percent) == (2, 50)
    assert (after_second.stable, after_second.canary) == (2, None)
    assert get_version(engine, MODEL, 2)["status"] == "production"
    actions = [e["action"] for e in rollout.events(engine, MODEL)]
    assert actions.count("step") == 2 and actions[-1] == "promoted"


def test_refresh_drops_cached_answers_when_the_versions_change(
    engine: Engine, tmp_path: Path
) -> None:
    rollout.promote(engine, MODEL, 1)
    gw = gateway(engine, tmp_path)

    async def run() -> tuple[bool, bool]:
        await gw.refresh()
        gw.cache.put(key(1), CachedCompletion(("v1 answer",)))
        await gw.refresh()  # nothing changed: the answer stays
        kept = gw.cache.get(key(1)) is not None
        rollout.promote(engine, MODEL, 2)
        await gw.refresh()
        return kept, gw.cache.get(key(1)) is None

    kept, dropped = asyncio.run(run())
    assert kept and dropped
