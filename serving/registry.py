"""The serving side's view of the model registry (workers/trainer/registry.py's tables).

Serving reads registered versions and records status changes (production, staging,
retired) on the same `model_versions` rows the trainer writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.db import ModelVersion
from workers.trainer.registry import get_version, list_versions, version_event

__all__ = ["get_version", "list_versions", "set_status"]


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
