"""Serving tables (migration 0004): API keys, daily usage, rollouts and their history."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import Boolean, Date, DateTime, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from exforge.db import Base


def _now() -> datetime:
    return datetime.now(UTC)


class ApiKey(Base):
    """A gateway API key: only its SHA-256 is stored; scopes are comma-separated."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    scopes: Mapped[str] = mapped_column(String(512))
    rate_per_s: Mapped[float | None] = mapped_column(Float)
    burst: Mapped[int | None] = mapped_column(Integer)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class UsageDaily(Base):
    """Tokens served per key, day, model and version."""

    __tablename__ = "usage_daily"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)


class Rollout(Base):
    """Which versions of a model serve: stable, and an optional canary with its share."""

    __tablename__ = "serving_rollouts"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    stable_version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer)
    canary_version: Mapped[int | None] = mapped_column(Integer)
    canary_percent: Mapped[float] = mapped_column(Float, default=0.0)
    sticky: Mapped[bool] = mapped_column(Boolean, default=True)
    steps: Mapped[str] = mapped_column(Text, default="[]")  # remaining percents, JSON
    step_interval_s: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RolloutEvent(Base):
    """History: promotions, splits, steps and (automatic) rollbacks."""

    __tablename__ = "serving_rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    action: Mapped[str] = mapped_column(String(32))
    version: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
