"""Usage per API key and day: requests, prompt and completion tokens actually served."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import UsageDaily


def record(
    engine: Engine, key_id: str, model: str, version: int, prompt: int, completion: int
) -> None:
    day = datetime.now(UTC).date()
    with Session(engine) as session, session.begin():
        row = session.get(UsageDaily, (key_id, day, model, version)) or UsageDaily(
            key_id=key_id,
            day=day,
            model=model,
            version=version,
            requests=0,
            prompt_tokens=0,
            completion_tokens=0,
        )
        row.requests += 1
        row.prompt_tokens += prompt
        row.completion_tokens += completion
        session.add(row)


def report(engine: Engine) -> list[dict[str, Any]]:
    query = select(UsageDaily).order_by(
        UsageDaily.day, UsageDaily.key_id, UsageDaily.model, UsageDaily.version
    )
    with Session(engine) as session:
        return [
            {
                "key_id": row.key_id,
                "day": row.day.isoformat(),
                "model": row.model,
                "version": row.version,
                "requests": row.requests,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
            }
            for row in session.scalars(query)
        ]
