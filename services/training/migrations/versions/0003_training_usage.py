"""Per-minute training usage buckets shared by every worker (issue 17 accounting in a cluster).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_usage",
        sa.Column("minute_start", sa.BigInteger(), primary_key=True),
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("device", sa.String(8), primary_key=True),
        sa.Column("seconds", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("training_usage")
