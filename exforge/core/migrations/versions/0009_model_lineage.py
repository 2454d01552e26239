"""model_versions: lineage of compressed versions; versions without an adapter

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("parent_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("method", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("parameters", sa.Text(), nullable=True))
        batch.alter_column("adapter_key", existing_type=sa.String(length=1024), nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("adapter_key", existing_type=sa.String(length=1024), nullable=False)
        batch.drop_column("parameters")
        batch.drop_column("method")
        batch.drop_column("parent_version")
