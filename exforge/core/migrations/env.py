"""Alembic environment: runs on the connection exforge hands over, or on the URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from exforge.core.db import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as own:
        context.configure(connection=own, target_metadata=Base.metadata, render_as_batch=True)
        context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    context.run_migrations()
