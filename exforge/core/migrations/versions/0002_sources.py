"""sources: seen releases, persisted ETags, license outcomes

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seen_releases",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=256), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("retired", sa.Boolean(), nullable=False),
        sa.Column("retirement", sa.String(length=512), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "package", "version"),
    )
    op.create_table(
        "http_cache",
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("etag", sa.String(length=512), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("url"),
    )
    op.create_table(
        "license_outcomes",
        sa.Column("source_id", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=256), nullable=False),
        sa.Column("declared", sa.String(length=512), nullable=True),
        sa.Column("spdx", sa.String(length=256), nullable=True),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("source_id"),
    )
    with op.batch_alter_table("license_outcomes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_license_outcomes_package"), ["package"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("license_outcomes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_license_outcomes_package"))
    op.drop_table("license_outcomes")
    op.drop_table("http_cache")
    op.drop_table("seen_releases")
