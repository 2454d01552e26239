"""samples: the index of `shard_index` also holds `recorded_at`

The shard stage asks every second when the oldest pending sample (`shard_index` NULL)
was staged; with this index the answer is read from the index alone, where before each
pending row was read (its payload included).

Revision ID: 0011
Revises: 0010
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_index("ix_samples_shard_index")
        batch.create_index("ix_samples_pending", ["shard_index", "recorded_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_index("ix_samples_pending")
        batch.create_index("ix_samples_shard_index", ["shard_index"], unique=False)
