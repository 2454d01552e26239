"""Rollouts: blue-green promotion, canary split (sticky by hash or random), gradual steps,
and automatic rollback when a canary's error rate or p95 latency passes a threshold.

The state lives in `serving_rollouts`, so the CLI and every gateway replica share it;
each gateway re-reads it every second and judges canaries on its own traffic.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import Rollout, RolloutEvent
from exforge.llm.registry import set_status


class RolloutError(ValueError):
    pass


@dataclass(frozen=True)
class RolloutState:
    name: str
    stable: int
    canary: int | None
    percent: float
    sticky: bool
    steps: tuple[float, ...]
    step_interval_s: float
    updated_at: datetime

    @classmethod
    def of(cls, row: Rollout) -> RolloutState:
        return cls(
            row.name,
            row.stable_version,
            row.canary_version,
            row.canary_percent,
            row.sticky,
            tuple(json.loads(row.steps)),
            row.step_interval_s,
            row.updated_at.replace(tzinfo=row.updated_at.tzinfo or UTC),
        )

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "steps": list(self.steps), "updated_at": self.updated_at}

    def choose(self, sticky_key: str | None) -> int:
        """The version that serves a request: canary for `percent` % of keys or calls."""
        if self.canary is None or self.percent <= 0:
            return self.stable
        return (
            self.canary
            if bucket(self.name, sticky_key, self.sticky) < self.percent
            else self.stable
        )


def bucket(name: str, sticky_key: str | None, sticky: bool) -> float:
    """A position in [0, 100): a stable hash of the user or key, or random."""
    if not sticky or sticky_key is None:
        return random.random() * 100
    digest = hashlib.sha256(f"{name}\0{sticky_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


# ---------------------------------------------------------------- state in the database


def _event(session: Session, name: str, action: str, version: int | None, detail: str) -> None:
    session.add(RolloutEvent(name=name, action=action, version=version, detail=detail))


def get_state(engine: Engine, name: str) -> RolloutState | None:
    with Session(engine) as session:
        row = session.get(Rollout, name)
        return None if row is None else RolloutState.of(row)


def all_states(engine: Engine) -> dict[str, RolloutState]:
    with Session(engine) as session:
        return {row.name: RolloutState.of(row) for row in session.scalars(select(Rollout))}


def events(engine: Engine, name: str | None = None) -> list[dict[str, Any]]:
    query = select(RolloutEvent).order_by(RolloutEvent.id)
    if name:
        query = query.where(RolloutEvent.name == name)
    with Session(engine) as session:
        return [
            {
                "name": e.name,
                "action": e.action,
                "version": e.version,
                "detail": e.detail,
                "at": e.at.isoformat(),
            }
            for e in session.scalars(query)
        ]


def promote(engine: Engine, name: str, version: int) -> RolloutState:
    """Blue-green: `version` takes all traffic at once; the old one stays for rollback."""
    with Session(engine) as session, session.begin():
        row = session.get(Rollout, name)
        previous = None if row is None else row.stable_version
        row = row or Rollout(name=name)
        row.previous_version = previous if previous != version else row.previous_version
        row.stable_version = version
        row.canary_version, row.canary_percent, row.steps = None, 0.0, "[]"
        row.sticky = True if row.sticky is None else row.sticky
        row.step_interval_s = 0.0
        row.updated_at = datetime.now(UTC)
        session.add(row)
        _event(session, name, "promoted", version, f"previous {previous}")
    set_status(engine, name, version, "production", "promoted")
    if previous is not None and previous != version:
        set_status(engine, name, previous, "staging", "promoted")
    return _state(engine, name)


def split(
    engine: Engine,
    name: str,
    canary: int,
    percent: float,
    sticky: bool = True,
    steps: list[float] | None = None,
    step_interval_s: float = 0.0,
) -> RolloutState:
    """Send `percent` % to `canary`; `steps` (later percents) advance every interval while
    the canary stays healthy, and reaching 100 promotes it."""
    if not 0 <= percent <= 100 or any(not 0 < s <= 100 for s in steps or []):
        raise RolloutError("percentages must lie in [0, 100]")
    with Session(engine) as session, session.begin():
        row = session.get(Rollout, name)
        if row is None:
            raise RolloutError(f"{name} has no stable version yet: promote one first")
        if canary == row.stable_version:
            raise RolloutError(f"version {canary} is already the stable version")
        row.canary_version, row.canary_percent, row.sticky = canary, percent, sticky
        row.steps = json.dumps(sorted(steps or []))
        row.step_interval_s = step_interval_s
        row.updated_at = datetime.now(UTC)
        _event(session, name, "split", canary, f"{percent:g}% sticky={sticky} steps={steps}")
    set_status(engine, name, canary, "staging", "split")
    return _state(engine, name)


def rollback(
    engine: Engine, name: str, reason: str = "manual", canary: int | None = None
) -> RolloutState:
    """Drop the canary if there is one, else go back to the previous stable version.
    With `canary`, only that canary is dropped (a no-op once it is gone: gateways that
    judge it at the same time roll back once)."""
    with Session(engine) as session, session.begin():
        row = session.get(Rollout, name)
        if row is None:
            raise RolloutError(f"{name} has no rollout")
        if canary is not None and row.canary_version != canary:
            return RolloutState.of(row)
        if row.canary_version is not None:
            retired = row.canary_version
            row.canary_version, row.canary_percent, row.steps = None, 0.0, "[]"
        elif row.previous_version is not None:
            retired = row.stable_version
            row.stable_version, row.previous_version = row.previous_version, None
        else:
            raise RolloutError(f"{name} has neither a canary nor a previous version")
        row.updated_at = datetime.now(UTC)
        stable = row.stable_version
        _event(session, name, "rolled_back", retired, reason)
    set_status(engine, name, retired, "retired", "rolled_back")
    set_status(engine, name, stable, "production", "promoted")
    return _state(engine, name)


def advance(engine: Engine, name: str) -> RolloutState:
    """Take the next gradual step; at 100 % the canary is promoted."""
    with Session(engine) as session, session.begin():
        row = session.get(Rollout, name)
        steps = json.loads(row.steps)
        if row.canary_version is None or not steps:
            return RolloutState.of(row)
        row.canary_percent, row.steps = steps[0], json.dumps(steps[1:])
        row.updated_at = datetime.now(UTC)
        canary, percent = row.canary_version, row.canary_percent
        _event(session, name, "step", canary, f"{percent:g}%")
    return promote(engine, name, canary) if percent >= 100 else _state(engine, name)


def _state(engine: Engine, name: str) -> RolloutState:
    state = get_state(engine, name)
    assert state is not None
    return state


# ------------------------------------------------------------------- canary judgement


@dataclass(frozen=True)
class Thresholds:
    window_s: float
    min_requests: int
    error_rate: float
    p95_s: float


class HealthWindow:
    """Outcomes of one version over the last `window_s` seconds."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, bool, float]] = deque()

    def add(self, ok: bool, latency_s: float) -> None:
        now = time.monotonic()
        self.samples.append((now, ok, latency_s))
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()

    def verdict(self, limits: Thresholds) -> str | None:
        """Why the version should be rolled back, or None."""
        n = len(self.samples)
        if n < limits.min_requests:
            return None
        errors = sum(not ok for _, ok, _ in self.samples)
        if errors / n > limits.error_rate:
            return f"error rate {errors / n:.0%} over {n} requests > {limits.error_rate:.0%}"
        latencies = sorted(latency for _, ok, latency in self.samples if ok)
        if latencies:
            p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            if p95 > limits.p95_s:
                return f"p95 latency {p95:.2f}s over {n} requests > {limits.p95_s:g}s"
        return None
