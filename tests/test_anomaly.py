"""Anomaly detection: steady noise raises nothing; a slowdown injected into a stage, a
latency spike injected into serving and a growing lag are each raised (as metrics, rows
and `exforge alerts`), and cleared once the signal is steady again. The injections go
into the same Prometheus metrics the stage loop and the gateway write."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from exforge.cli.main import app
from exforge.core.anomaly import RULES, Detector, MeanWatch, Monitor, StageWatch, serving_tick
from exforge.core.db import engine_for
from exforge.core.telemetry import STAGE_LATENCY
from serving import metrics

START = datetime(2026, 1, 1, tzinfo=UTC)
LOOK_S = 2.0


@pytest.mark.parametrize(
    ("signal", "level", "spread"),
    [
        ("stage_latency", 0.02, 0.004),
        ("stage_throughput", 200.0, 30.0),
        ("lag_growth", 0.0, 15.0),
        ("serving_latency", 1.5, 0.3),
    ],
)
def test_steady_noise_raises_nothing(signal: str, level: float, spread: float) -> None:
    noise = random.Random(7)
    detector = Detector(RULES[signal])
    changes = [detector.observe(noise.gauss(level, spread)) for _ in range(2000)]
    assert not any(changes), f"{signal}: {changes.count('raised')} false alarms"


def test_a_single_outlier_is_not_confirmed_but_a_level_shift_is() -> None:
    noise = random.Random(3)
    detector = Detector(RULES["stage_latency"])
    for _ in range(50):
        assert detector.observe(noise.gauss(0.02, 0.002)) is None
    assert detector.observe(0.5) is None, "one slow message"
    assert [detector.observe(noise.gauss(0.02, 0.002)) for _ in range(10)] == [None] * 10
    shifted = [detector.observe(noise.gauss(0.08, 0.002)) for _ in range(3)]
    assert shifted == [None, None, "raised"]


def ticks(start: int, count: int) -> list[tuple[float, datetime]]:
    return [
        (i * LOOK_S, START + timedelta(seconds=i * LOOK_S)) for i in range(start, start + count)
    ]


def test_a_slowed_stage_is_raised_listed_by_alerts_and_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'exforge.db'}"
    watch = StageWatch(Monitor(engine_for(url)))
    stage, noise = "parse-slowed", random.Random(11)

    def look(seconds: float, now: datetime, latency: float, backlog: int) -> list[str]:
        for _ in range(20):  # the messages handled since the last look
            STAGE_LATENCY.labels(stage).observe(noise.gauss(latency, latency / 10))
        return watch.tick({stage: backlog}, seconds, now)

    assert not [c for s, n in ticks(0, 60) for c in look(s, n, 0.02, 100)]
    raised = [c for s, n in ticks(60, 5) for c in look(s, n, 0.2, 100)]
    assert f"raised stage_latency {stage}" in raised
    assert f"raised stage_throughput {stage}" not in raised, "throughput comes from counts"
    value = REGISTRY.get_sample_value(
        "exforge_anomaly", {"signal": "stage_latency", "subject": stage}
    )
    assert value == 1

    monkeypatch.setenv("EXFORGE_DATABASE_URL", url)
    monkeypatch.setenv("EXFORGE_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["alerts", "--json"])
    assert result.exit_code == 0, result.output
    [alert] = json.loads(result.output)
    assert (alert["signal"], alert["subject"], alert["unit"]) == ("stage_latency", stage, "s")
    assert alert["value"] > 0.15 and 0.015 < alert["baseline"] < 0.025 and alert["score"] > 6

    cleared = [c for s, n in ticks(65, 80) for c in look(s, n, 0.2, 100)]
    assert f"cleared stage_latency {stage}" in cleared, "the new level becomes the baseline"
    assert json.loads(CliRunner().invoke(app, ["alerts", "--json"]).output) == []


def test_growing_lag_is_raised(tmp_path: Path) -> None:
    watch = StageWatch(Monitor(engine_for(f"sqlite:///{tmp_path / 'exforge.db'}")))
    noise = random.Random(5)
    lag, changes = 500, []
    for i, (seconds, now) in enumerate(ticks(0, 80)):
        lag = max(0, lag + int(noise.gauss(0, 10)) + (400 if i >= 70 else 0))
        changes += watch.tick({"instruct-lagging": lag}, seconds, now)
    assert changes == ["raised lag_growth instruct-lagging"]


def test_a_serving_latency_spike_is_raised(tmp_path: Path) -> None:
    monitor = Monitor(engine_for(f"sqlite:///{tmp_path / 'exforge.db'}"))
    watch = MeanWatch(metrics.LATENCY_METRIC)
    noise, changes = random.Random(9), []
    for i, (_, now) in enumerate(ticks(0, 45)):
        latency = 1.5 if i < 40 else 6.0  # Triton suddenly four times slower
        for _ in range(8):
            metrics.LATENCY.labels("spiky", "3").observe(noise.gauss(latency, 0.2))
        changes += [c for c in serving_tick(monitor, watch, now) if "spiky" in c]
    assert changes == ["raised serving_latency spiky:3"]
