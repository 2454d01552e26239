"""Usage per API key and day: requests, prompt and completion tokens actually served."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exforge.core.db import UsageDaily


def record(
    engine: Engine, key_id: str, model: str, version: int, prompt: int, completion: int
) -> None:
    """Add one served request. Increments happen in the database (`requests + 1`), so
    gateways recording the same key and day at once lose none of them."""
    day = datetime.now(UTC).date()
    row = (
        UsageDaily.key_id == key_id,
        UsageDaily.day == day,
        UsageDaily.model == model,
        UsageDaily.version == version,
    )
    increment = (
        update(UsageDaily)
        .where(*row)
        .values(
            requests=UsageDaily.requests + 1,
            prompt_tokens=UsageDaily.prompt_tokens + prompt,
            completion_tokens=UsageDaily.completion_tokens + completion,
        )
    )
    with Session(engine) as session, session.begin():
        if session.execute(increment).rowcount:
            return
    first = UsageDaily(
        key_id=key_id,
        day=day,
        model=model,
        version=version,
        requests=1,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )
    try:
        with Session(engine) as session, session.begin():
            session.add(first)
    except IntegrityError:  # another gateway inserted the day's row first
        with Session(engine) as session, session.begin():
            session.execute(increment)


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
