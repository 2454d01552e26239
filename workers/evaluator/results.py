"""Evaluation results per model version in the registry's `evaluation_results` table.

One row per (model, version, benchmark, metric); a new evaluation of the same version on
the same benchmark replaces its rows. The full result document goes to the store as
`evals/<model>/<version>/<benchmark>.json` (see `report.py`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from exforge.db import EvaluationResult, ModelVersion


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a result document that go to the registry."""
    metrics: dict[str, float] = {f"pass@{k}": v for k, v in result["pass_at_k"].items()}
    for name in ("compile_rate", "chrf", "warnings", "problems", "samples"):
        if result.get(name) is not None:
            metrics[name] = float(result[name])
    return metrics


def record_results(engine: Engine, model: str, version: int, result: dict[str, Any]) -> None:
    benchmark = result["benchmark"]
    with Session(engine) as session, session.begin():
        session.execute(
            delete(EvaluationResult).where(
                EvaluationResult.model_name == model,
                EvaluationResult.version == version,
                EvaluationResult.benchmark == benchmark,
            )
        )
        session.add_all(
            EvaluationResult(
                model_name=model, version=version, benchmark=benchmark, metric=metric, value=value
            )
            for metric, value in metrics_of(result).items()
        )


def stored_metric(
    engine: Engine, model: str, version: int, benchmark: str, metric: str = "pass@1"
) -> float | None:
    query = (
        select(EvaluationResult.value)
        .where(
            EvaluationResult.model_name == model,
            EvaluationResult.version == version,
            EvaluationResult.benchmark == benchmark,
            EvaluationResult.metric == metric,
        )
        .order_by(EvaluationResult.id.desc())
        .limit(1)
    )
    with Session(engine) as session:
        return session.scalar(query)


def production_version(engine: Engine, model: str) -> int | None:
    """The version of `model` whose registry status is production (newest if several)."""
    query = (
        select(ModelVersion.version)
        .where(ModelVersion.name == model, ModelVersion.status == "production")
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    with Session(engine) as session:
        return session.scalar(query)
