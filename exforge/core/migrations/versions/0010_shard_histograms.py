"""shards: members counted by difficulty and by kind, so a manifest reads shard rows only

Shards sealed before this revision get their counts from their members here, so every
row has them and the manifest has one way to read them.

Revision ID: 0010
Revises: 0009
"""

from collections import Counter
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

samples = sa.table(
    "samples",
    sa.column("dataset", sa.String),
    sa.column("stage", sa.Integer),
    sa.column("split", sa.String),
    sa.column("shard_index", sa.Integer),
    sa.column("difficulty", sa.Integer),
    sa.column("kind", sa.String),
)
shards = sa.table(
    "shards",
    sa.column("id", sa.Integer),
    sa.column("dataset", sa.String),
    sa.column("stage", sa.Integer),
    sa.column("split", sa.String),
    sa.column("shard_index", sa.Integer),
    sa.column("difficulties", sa.JSON),
    sa.column("kinds", sa.JSON),
)
SHARD = (shards.c.dataset, shards.c.stage, shards.c.split, shards.c.shard_index)
MEMBER = (samples.c.dataset, samples.c.stage, samples.c.split, samples.c.shard_index)


def member_counts(
    connection: sa.Connection, column: sa.ColumnClause[Any]
) -> dict[tuple[Any, ...], dict[str, int]]:
    """Per shard (dataset, stage, split, index): its members counted by `column`'s value,
    keyed by the value's text, in key order, as the shard stage records them (this
    revision's own copy of that rule: a migration must not change when the code does)."""
    counts: dict[tuple[Any, ...], Counter[str]] = {}
    query = (
        sa.select(*MEMBER, column, sa.func.count())
        .where(samples.c.shard_index.is_not(None))
        .group_by(*MEMBER, column)
    )
    for *shard, value, count in connection.execute(query):
        counts.setdefault(tuple(shard), Counter())[str(value)] = count
    return {shard: dict(sorted(counter.items())) for shard, counter in counts.items()}


def upgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("difficulties", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("kinds", sa.JSON(), nullable=True))
    connection = op.get_bind()
    difficulties = member_counts(connection, samples.c.difficulty)
    kinds = member_counts(connection, samples.c.kind)
    filled = [
        {
            "shard_id": id_,
            "shard_difficulties": difficulties.get(tuple(shard), {}),
            "shard_kinds": kinds.get(tuple(shard), {}),
        }
        for id_, *shard in connection.execute(sa.select(shards.c.id, *SHARD))
    ]
    if filled:
        connection.execute(
            shards.update()
            .where(shards.c.id == sa.bindparam("shard_id"))
            .values(
                difficulties=sa.bindparam("shard_difficulties", type_=sa.JSON),
                kinds=sa.bindparam("shard_kinds", type_=sa.JSON),
            ),
            filled,
        )
    with op.batch_alter_table("shards") as batch:
        batch.alter_column("difficulties", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("kinds", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("kinds")
        batch.drop_column("difficulties")
