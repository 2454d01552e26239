"""Anomaly detection: sudden changes in stage latency and throughput, consumer-lag growth
and serving latency, against a robust baseline of each signal's own recent past.

Every few seconds a process turns its Prometheus metrics into one observation per signal
and subject (a stage, a topic, a model version): the mean latency of the messages or
requests since the last look, the messages per second while the stage has a backlog, the
growth of the lag. A `Detector` keeps the last `window` observations; an observation
scores (x - median) / scale, with scale = 1.4826 * MAD (the standard deviation of normal
noise), never below the signal's floor. A signal is raised once `confirm` observations in
a row score beyond `threshold` in its bad direction (slower, less throughput, growing
lag), and cleared once `confirm` in a row fall back under half of it. Steady noise, however
large, moves the median and MAD with it and raises nothing; a single outlier is not
confirmed. Raised and cleared anomalies are gauges (`exforge_anomaly`, for Prometheus'
alert rules) and rows of the `anomalies` table (for `exforge alerts`).
"""

from __future__ import annotations

import os
import socket
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from prometheus_client import REGISTRY
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import Anomaly
from exforge.core.telemetry import ANOMALY, ANOMALY_SCORE

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Rule:
    direction: Literal[1, -1]  # +1: higher is worse (latency, lag growth); -1: lower
    floor: float  # smallest scale: changes below this are never anomalies
    unit: str


RULES = {
    "stage_latency": Rule(1, 0.002, "s"),
    "stage_throughput": Rule(-1, 1.0, "msg/s"),
    "lag_growth": Rule(1, 20.0, "msg"),
    "serving_latency": Rule(1, 0.05, "s"),
}


@dataclass
class Detector:
    rule: Rule
    window: int = 60
    warmup: int = 20
    threshold: float = 6.0
    confirm: int = 3
    values: deque[float] = field(default_factory=deque)
    active: bool = False
    streak: int = 0
    score: float = 0.0

    def baseline(self) -> tuple[float, float]:
        """(median, scale) of the window."""
        median = statistics.median(self.values)
        mad = statistics.median(abs(v - median) for v in self.values)
        return median, max(MAD_TO_SIGMA * mad, self.rule.floor)

    def observe(self, value: float) -> Literal["raised", "cleared"] | None:
        """Take one observation; say when the signal is raised or cleared by it."""
        change: Literal["raised", "cleared"] | None = None
        if len(self.values) >= self.warmup:
            median, scale = self.baseline()
            self.score = self.rule.direction * (value - median) / scale
            beyond = self.score > (self.threshold / 2 if self.active else self.threshold)
            self.streak = self.streak + 1 if beyond != self.active else 0
            if self.streak >= self.confirm:
                self.active, self.streak = not self.active, 0
                change = "raised" if self.active else "cleared"
        self.values.append(value)
        if len(self.values) > self.window:
            self.values.popleft()
        return change


def _origin() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def record(
    engine: Engine, signal: str, subject: str, detector: Detector, value: float, now: datetime
) -> None:
    """Keep the anomaly's row in step with the detector (one row per signal and subject)."""
    median, _ = detector.baseline()
    with Session(engine) as session, session.begin():
        row = session.get(Anomaly, (signal, subject)) or Anomaly(signal=signal, subject=subject)
        if detector.active and not row.active:
            row.since = now
        row.active = detector.active
        row.value, row.baseline, row.score = value, median, detector.score
        row.origin, row.updated_at = _origin(), now
        session.add(row)


def active(engine: Engine) -> list[dict[str, Any]]:
    """Active anomalies, oldest first."""
    with Session(engine) as session:
        rows = session.scalars(
            select(Anomaly).where(Anomaly.active.is_(True)).order_by(Anomaly.since)
        ).all()
        return [
            {
                "signal": r.signal,
                "subject": r.subject,
                "since": r.since.isoformat() if r.since else None,
                "value": r.value,
                "baseline": r.baseline,
                "score": round(r.score, 2),
                "unit": RULES[r.signal].unit if r.signal in RULES else "",
                "origin": r.origin,
            }
            for r in rows
        ]


@dataclass
class Monitor:
    """The detectors of one process; changes go to the gauges and the database."""

    engine: Engine
    detectors: dict[tuple[str, str], Detector] = field(default_factory=dict)

    def observe(self, signal: str, subject: str, value: float, now: datetime) -> str | None:
        detector = self.detectors.setdefault((signal, subject), Detector(RULES[signal]))
        change = detector.observe(value)
        ANOMALY_SCORE.labels(signal, subject).set(detector.score)
        if change:
            ANOMALY.labels(signal, subject).set(1 if detector.active else 0)
            record(self.engine, signal, subject, detector, value, now)
        return change


def histogram_totals(metric: str) -> dict[tuple[str, ...], tuple[float, float]]:
    """(sum, count) of every label set of a histogram in this process's registry."""
    totals: dict[tuple[str, ...], list[float]] = {}
    for family in REGISTRY.collect():
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name in (f"{metric}_sum", f"{metric}_count"):
                labels = tuple(sample.labels.values())
                pair = totals.setdefault(labels, [0.0, 0.0])
                pair[0 if sample.name.endswith("_sum") else 1] = sample.value
    return {labels: (s, c) for labels, (s, c) in totals.items()}


@dataclass
class MeanWatch:
    """Mean of a histogram's new observations since the last look, per label set."""

    metric: str
    last: dict[tuple[str, ...], tuple[float, float]] = field(default_factory=dict)

    def means(self) -> dict[tuple[str, ...], tuple[float, float]]:
        """label set → (mean of the new observations, how many)."""
        now = histogram_totals(self.metric)
        means = {}
        for labels, (total, count) in now.items():
            old_total, old_count = self.last.get(labels, (0.0, 0.0))
            if count > old_count:
                means[labels] = ((total - old_total) / (count - old_count), count - old_count)
        self.last = now
        return means


@dataclass
class StageWatch:
    """A worker's signals: per-stage latency and throughput (while the stage has a
    backlog), and per-input lag growth."""

    monitor: Monitor
    latency: MeanWatch = field(default_factory=lambda: MeanWatch("exforge_stage_latency_seconds"))
    lag: dict[str, int] = field(default_factory=dict)
    looked: float | None = None

    def tick(self, backlog: dict[str, int], seconds: float, now: datetime) -> list[str]:
        """One look: `backlog` is each stage's input lag, `seconds` the monotonic clock.
        Returns the changes, as "raised stage_latency parse"."""
        changes = []
        elapsed = None if self.looked is None else seconds - self.looked
        self.looked = seconds
        for (stage,), (mean, count) in self.latency.means().items():
            changes.append(self._see("stage_latency", stage, mean, now))
            if elapsed and backlog.get(stage, 0) > 0:
                changes.append(self._see("stage_throughput", stage, count / elapsed, now))
        for stage, lag in backlog.items():
            if stage in self.lag:
                changes.append(self._see("lag_growth", stage, lag - self.lag[stage], now))
            self.lag[stage] = lag
        return [c for c in changes if c]

    def _see(self, signal: str, subject: str, value: float, now: datetime) -> str | None:
        change = self.monitor.observe(signal, subject, value, now)
        return f"{change} {signal} {subject}" if change else None


def serving_tick(monitor: Monitor, watch: MeanWatch, now: datetime) -> list[str]:
    """The gateway's signal: mean request latency per model version since the last look."""
    changes = []
    for labels, (mean, _count) in watch.means().items():
        subject = ":".join(labels)
        change = monitor.observe("serving_latency", subject, mean, now)
        if change:
            changes.append(f"{change} serving_latency {subject}")
    return changes


def utcnow() -> datetime:
    return datetime.now(UTC)


def lag_by_stage(rows: Iterable[Any], stage_of_topic: dict[str, str]) -> dict[str, int]:
    """Total input lag of each stage from per-partition lag rows."""
    backlog: dict[str, int] = {}
    for row in rows:
        stage = stage_of_topic.get(row.topic)
        if stage is not None:
            backlog[stage] = backlog.get(stage, 0) + row.lag
    return backlog
