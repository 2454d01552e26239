"""The promotion gate on the registry (SQLite and PostgreSQL): stored pass@1 of candidate vs
production."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import EvaluationResult, engine_for
from exforge.core.settings import load_settings
from exforge.llm.gate import check_promotion, promotion_decision
from exforge.llm.registry import (
    production_version,
    record_results,
    register_version,
    set_status,
    stored_metric,
)
from workers.evaluator.benchmarks import Completion
from workers.evaluator.qa import load_idioms
from workers.evaluator.scoring import score_exact


def idiom_result(right: int) -> dict:
    """A real exact-match result on the idiom set: the first `right` problems answered
    correctly, the rest wrongly (pass@1 = right / problems)."""
    bench = load_idioms()
    answers = [
        Completion(p.name, p.answers[0] if index < right else "no idea")
        for index, p in enumerate(bench.problems)
    ]
    return score_exact(bench, answers, [1])


@pytest.fixture
def engine(database_url: str) -> Engine:
    engine = engine_for(database_url)
    for _ in range(4):
        register_version(engine, "m", "tiny", "models/m/x/adapter.safetensors", None, {})
    return engine


def test_results_replace_earlier_rows_of_the_same_benchmark(engine: Engine) -> None:
    record_results(engine, "m", 1, idiom_result(27))
    record_results(engine, "m", 1, idiom_result(0))
    assert stored_metric(engine, "m", 1, "idioms") == 0.0
    with Session(engine) as session:
        metrics = session.scalars(
            select(EvaluationResult.metric).where(EvaluationResult.version == 1)
        ).all()
    assert sorted(metrics) == ["pass@1", "problems", "samples", "warnings"]
    assert stored_metric(engine, "m", 1, "builtin") is None


def test_gate_refuses_a_drop_beyond_the_threshold_unless_forced(engine: Engine) -> None:
    total = len(load_idioms().problems)
    record_results(engine, "m", 1, idiom_result(total))  # pass@1 1.0, in production
    record_results(engine, "m", 2, idiom_result(total - 1))  # a small drop
    record_results(engine, "m", 3, idiom_result(total // 2))  # a large drop
    set_status(engine, "m", 1, "production", "promoted")
    assert production_version(engine, "m") == 1

    small = check_promotion(engine, "m", 2, "idioms", max_drop=0.05)
    assert small.allowed and small.reason.startswith("allowed: pass@1 on idioms: v2 0.963")
    refused = check_promotion(engine, "m", 3, "idioms", max_drop=0.05)
    assert not refused.allowed
    share = (total // 2) / total
    assert refused.reason == (
        f"refused: pass@1 on idioms: v3 {share:.3f} vs production v1 1.000 "
        f"(drop {1 - share:+.3f}, allowed 0.050)"
    )
    assert (refused.candidate, refused.production, refused.production_version) == (
        pytest.approx(share),
        1.0,
        1,
    )
    assert check_promotion(engine, "m", 3, "idioms", max_drop=0.6).allowed
    forced = check_promotion(engine, "m", 3, "idioms", max_drop=0.05, force=True)
    assert forced.allowed and forced.reason.startswith("forced")


def test_gate_without_scores_or_production(engine: Engine) -> None:
    first = check_promotion(engine, "m", 1, "idioms")
    assert first.allowed and "no other production version" in first.reason
    set_status(engine, "m", 1, "production", "promoted")
    unscored = check_promotion(engine, "m", 4, "idioms")
    assert not unscored.allowed
    assert "exforge eval run --model m:4 --benchmark idioms" in unscored.reason
    record_results(engine, "m", 4, idiom_result(3))
    baseline_missing = check_promotion(engine, "m", 4, "idioms")
    assert (
        baseline_missing.allowed and "production v1 has no stored pass@1" in baseline_missing.reason
    )


def test_gate_reads_its_benchmark_and_threshold_from_settings(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    defaults = load_settings(data_dir=tmp_path)
    assert (defaults.eval_gate_benchmark, defaults.eval_gate_max_drop) == ("builtin", 0.02)
    total = len(load_idioms().problems)
    record_results(engine, "m", 1, idiom_result(total))
    record_results(engine, "m", 2, idiom_result(total - 2))  # drop 2/27 = 0.074
    set_status(engine, "m", 1, "production", "promoted")
    assert "no stored pass@1 on builtin" in promotion_decision(defaults, engine, "m", 2).reason
    monkeypatch.setenv("EXFORGE_EVAL_GATE_BENCHMARK", "idioms")
    monkeypatch.setenv("EXFORGE_EVAL_GATE_MAX_DROP", "0.1")
    assert promotion_decision(load_settings(data_dir=tmp_path), engine, "m", 2).allowed
    monkeypatch.setenv("EXFORGE_EVAL_GATE_MAX_DROP", "0.05")
    strict = promotion_decision(load_settings(data_dir=tmp_path), engine, "m", 2)
    assert not strict.allowed and "allowed 0.050" in strict.reason


def test_models_promote_command_applies_the_gate(tmp_path: Path, database_url: str) -> None:
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    engine = engine_for(database_url)
    for _ in range(2):
        register_version(engine, "m", "tiny", "models/m/x/adapter.safetensors", None, {})
    total = len(load_idioms().problems)
    record_results(engine, "m", 1, idiom_result(total))
    record_results(engine, "m", 2, idiom_result(0))
    set_status(engine, "m", 1, "production", "promoted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFORGE_")}
    env.update(
        EXFORGE_DATA_DIR=str(data),
        EXFORGE_DATABASE_URL=database_url,
        EXFORGE_EVAL_GATE_BENCHMARK="idioms",
        EXFORGE_CONFIG=str(tmp_path / "absent.toml"),
        COLUMNS="200",
    )
    exforge = str(Path(sys.executable).parent / "exforge")

    def promote(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exforge, "models", "promote", "m", "2", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    refused = promote()
    assert refused.returncode == 1
    assert "refused: pass@1 on idioms: v2 0.000 vs production v1 1.000" in refused.stderr
    forced = promote("--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert production_version(engine, "m") == 2
