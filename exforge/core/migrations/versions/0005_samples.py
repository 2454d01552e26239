"""samples: difficulty, tokens, license, source and curriculum position; dropped samples

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("difficulty", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("tokens", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("license", sa.String(length=256), nullable=True))
        batch.add_column(sa.Column("source_id", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("position", sa.Integer(), nullable=True))
    op.create_table(
        "sample_drops",
        sa.Column("sample_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=512), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sample_id"),
    )


def downgrade() -> None:
    op.drop_table("sample_drops")
    with op.batch_alter_table("samples") as batch:
        for column in ("position", "source_id", "license", "tokens", "difficulty"):
            batch.drop_column(column)
