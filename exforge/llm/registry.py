"""Model registry: runs, checkpoints, model versions and their evaluation results in
the SQL database.

Versions are integers per model name, assigned in the registering transaction, and
every registration is announced on `models.versions` when a broker is configured.
Serving records status changes (production, staging, retired) on the same rows.
Evaluation results: one row per (model, version, benchmark, metric); a new evaluation
of the same version on the same benchmark replaces its rows (the full result document
goes to the store as `evals/<model>/<version>/<benchmark>.json`).
"""

from __future__ import annotations

import json
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exforge.core.db import EvaluationResult, ModelVersion, RunCheckpoint, TrainingRun
from schemas.records import ModelVersionEvent


class Lineage(BaseModel):
    """Where a compressed version comes from: its parent, the method and its parameters."""

    parent_version: int = Field(ge=1)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)


def start_run(engine: Engine, run_id: str, base_model: str, config: dict[str, Any]) -> None:
    """Record a run (again, on resume: the row is rewritten, not duplicated)."""
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id) or TrainingRun(run_id=run_id, step=0)
        row.base_model = base_model
        row.config = json.dumps(config, sort_keys=True)
        row.status = "running"
        session.add(row)


def finish_run(engine: Engine, run_id: str, status: str, step: int) -> None:
    with Session(engine) as session, session.begin():
        row = session.get(TrainingRun, run_id)
        if row is not None:
            row.status, row.step, row.finished_at = status, step, datetime.now(UTC)


def record_checkpoint(
    engine: Engine, run_id: str, step: int, stage: int, key: str, metrics: dict[str, float]
) -> None:
    with Session(engine) as session, session.begin():
        session.merge(
            RunCheckpoint(
                run_id=run_id, step=step, stage=stage, key=key, metrics=json.dumps(metrics)
            )
        )
        run = session.get(TrainingRun, run_id)
        if run is not None:
            run.step = step


# Registrations of one name racing for the same next version: all but one retry.
REGISTER_ATTEMPTS = 5


def register_version(
    engine: Engine,
    name: str,
    base_model: str,
    adapter_key: str | None,
    run_id: str | None,
    metrics: dict[str, float],
    lineage: Lineage | None = None,
) -> ModelVersionEvent:
    """Add the next version of `name` (a run registers once: a retry returns its row).

    Two runs registering at once may both read the same highest version; the unique
    (name, version) constraint refuses the later insert, which then tries again."""
    fields = {
        "base_model": base_model,
        "adapter_key": adapter_key,
        "metrics": json.dumps(metrics, sort_keys=True),
        "status": "registered",
        "parent_version": lineage.parent_version if lineage else None,
        "method": lineage.method if lineage else None,
        "parameters": json.dumps(lineage.parameters, sort_keys=True) if lineage else None,
    }
    for _ in range(REGISTER_ATTEMPTS - 1):
        with suppress(IntegrityError):
            return _register_once(engine, name, run_id, fields)
    return _register_once(engine, name, run_id, fields)


def _register_once(
    engine: Engine, name: str, run_id: str | None, fields: dict[str, Any]
) -> ModelVersionEvent:
    with Session(engine) as session, session.begin():
        existing = (
            session.scalar(
                select(ModelVersion).where(ModelVersion.name == name, ModelVersion.run_id == run_id)
            )
            if run_id
            else None
        )
        latest = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.name == name)
        )
        version = (latest or 0) + 1
        row = existing or ModelVersion(name=name, version=version, run_id=run_id, **fields)
        session.add(row)
        session.flush()
        return version_event(row, "registered")


def version_event(row: ModelVersion, action: str) -> ModelVersionEvent:
    return ModelVersionEvent(
        name=row.name,
        version=row.version,
        action=action,  # type: ignore[arg-type]
        status=row.status,  # type: ignore[arg-type]
        base_model=row.base_model,
        adapter_key=row.adapter_key,
        metrics=json.loads(row.metrics),
    )


def as_dict(row: ModelVersion) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "status": row.status,
        "base_model": row.base_model,
        "adapter_key": row.adapter_key,
        "run_id": row.run_id,
        "metrics": json.loads(row.metrics),
        "created_at": row.created_at.isoformat(),
        "parent_version": row.parent_version,
        "method": row.method,
        "parameters": json.loads(row.parameters) if row.parameters else {},
    }


def list_versions(engine: Engine, name: str | None = None) -> list[dict[str, Any]]:
    query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.version)
    if name:
        query = query.where(ModelVersion.name == name)
    with Session(engine) as session:
        return [as_dict(row) for row in session.scalars(query)]


def get_version(engine: Engine, name: str, version: int | None = None) -> dict[str, Any] | None:
    """One version, or the newest of `name` when `version` is None."""
    query = select(ModelVersion).where(ModelVersion.name == name)
    query = (
        query.where(ModelVersion.version == version)
        if version is not None
        else query.order_by(ModelVersion.version.desc()).limit(1)
    )
    with Session(engine) as session:
        row = session.scalar(query)
        return None if row is None else as_dict(row)


def set_status(engine: Engine, name: str, version: int, status: str, action: str) -> dict[str, Any]:
    """Set one version's status; returns the `models.versions` event for it."""
    with Session(engine) as session, session.begin():
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
        )
        if row is None:
            raise LookupError(f"model {name} has no version {version}")
        row.status = status
        return version_event(row, action).model_dump(mode="json")


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
