"""Per-tenant quota index, job webhooks and the webhook delivery outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("training_jobs", sa.Column("webhook_url", sa.String(2048), nullable=True))
    op.add_column("training_jobs", sa.Column("webhook_secret", sa.String(256), nullable=True))
    op.create_index("ix_training_jobs_tenant_state", "training_jobs", ["tenant", "state"])
    op.create_table(
        "training_webhook_deliveries",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("training_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_training_webhook_deliveries_key"),
    )
    op.create_index("ix_training_webhook_deliveries_due", "training_webhook_deliveries",
                    ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_training_webhook_deliveries_due", table_name="training_webhook_deliveries")
    op.drop_table("training_webhook_deliveries")
    op.drop_index("ix_training_jobs_tenant_state", table_name="training_jobs")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("webhook_secret")
        batch.drop_column("webhook_url")
