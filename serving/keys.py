"""API keys: random secrets shown once, stored as SHA-256, each with scopes and limits."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from exforge.core.db import ApiKey

SCOPES = ("generate", "models")  # generate: completions, chat, channel; models: /v1/models
PREFIX = "exf_"


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    name: str
    scopes: frozenset[str]
    rate_per_s: float | None
    burst: int | None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    engine: Engine,
    name: str,
    scopes: list[str],
    rate_per_s: float | None = None,
    burst: int | None = None,
) -> tuple[str, str]:
    """Create a key; returns (key id, the secret — never stored, shown once)."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)} (known: {', '.join(SCOPES)})")
    key_id = secrets.token_hex(8)
    secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    with Session(engine) as session, session.begin():
        session.add(
            ApiKey(
                key_id=key_id,
                key_hash=digest(secret),
                name=name,
                scopes=",".join(sorted(set(scopes))),
                rate_per_s=rate_per_s,
                burst=burst,
                revoked=False,
            )
        )
    return key_id, secret


def lookup(engine: Engine, secret: str) -> KeyInfo | None:
    with Session(engine) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest(secret)))
        if row is None or row.revoked:
            return None
        return KeyInfo(
            row.key_id,
            row.name,
            frozenset(filter(None, row.scopes.split(","))),
            row.rate_per_s,
            row.burst,
        )


def revoke(engine: Engine, key_id: str) -> bool:
    with Session(engine) as session, session.begin():
        row = session.get(ApiKey, key_id)
        if row is None:
            return False
        row.revoked = True
        return True
